"""BDH ("Baby Dragon Hatchling", arXiv 2509.26507). MODEL.md states the math, the parameter names and
shapes, and the FLOP count that this file implements.

Parameter names and shapes are the checkpoint format: embed.weight, encoder, encoder_v, decoder,
lm_head. The same encoder / encoder_v / decoder are used by every layer.

The layer is written once (layer_forward) and serves training, the recomputation of checkpointed
layers, generation and the low-precision paths:
- training runs the layer stack as one autograd Function with a hand-written backward (LayerStack,
  through parallel_forward: BDH.forward's, and the Hugging Face export's with gradients): r·rᵀ
  forward and the gradient's products with r backward are computed only in tiles on or below the
  diagonal; between forward and backward a layer keeps one (H, B, T, N) activation (a = relu(x @ encoder)),
  its dropout mask as bits and (H, B, T, T)-, (H, B, T, D)- and (B, T, D)-sized tensors, and
  recomputes the rest (with activation_checkpointing it keeps only its input and its dropout bits); the
  shared weights' gradients accumulate in place across layers;
- generation uses the recurrent form: a state of size N x D per layer and head carries the earlier
  positions, so each new token costs the same whatever the context (BDH.generate);
- the weight products go through a Matmuls object: FP8 training plugs in its own
  (fp8.FP8Matmuls), and the 4-bit modes replace the weights they read (BDH.weight_view).
reference.py holds the straightforward implementation that the tests compare this one against.

To change the layer (another attention, say), these go together: layer_forward, the one forward;
layer_backward, its gradient by hand (from the tensors layer_forward saves); recurrent_forward, the
same layer for generation; reference.reference_forward, the yardstick the tests hold them to;
BDHConfig.training_flops_per_token and runtime.activation_bytes, what it costs; MODEL.md. To try an
idea first, reference_forward trains and evaluates through autograd (assign it to BDH.forward): slow,
it reads the weights as they are (not use_4bit's view), and generation still goes through this file's
recurrent_forward.
"""
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# Inductor generates no code for complex numbers: under torch.compile rope's complex products run
# as eager kernels inside the compiled graph, and inductor warns that performance "may be worse
# than eager". It is not (measured on CPU: the compiled step 2.4x faster than eager; rope in real
# arithmetic, which inductor fuses, no faster than this), so the warning would only alarm.
warnings.filterwarnings("ignore", message="Torchinductor does not support code generation for complex operators")

ROPE_THETA = 2.0**16
LN_EPS = 1e-5
TILE = 64  # rows per tile of the causal attention
CHUNK = 1024  # latent columns per slice where backward avoids a full (H, B*T, N) temporary for z
LAYER_WEIGHTS = ("encoder", "encoder_v", "decoder")  # shared by all layers; the 4-bit modes quantize these
SAMPLE_TEMPERATURE = 0.8  # sample.py's default, the evaluations' samples and an export's generate()


@dataclass
class BDHConfig:
    n_layer: int = 6
    n_embd: int = 256
    dropout: float = 0.1
    n_head: int = 4
    mlp_internal_dim_multiplier: int = 128
    vocab_size: int = 256

    @property
    def n_latent(self) -> int:
        """N: latent neurons per head."""
        return self.mlp_internal_dim_multiplier * self.n_embd // self.n_head

    @property
    def n_params(self) -> int:
        """embed and lm_head (V x D each), encoder and encoder_v (H x D x N each), decoder (H N x D)."""
        return 2 * self.vocab_size * self.n_embd + 3 * self.n_head * self.n_embd * self.n_latent

    def training_flops_per_token(self, block_size: int) -> float:
        """Forward + backward = 3 x forward (MODEL.md): the three weight GEMMs per layer, the causal
        half of the attention at sequence length block_size, and lm_head."""
        L, D, H, N, V = self.n_layer, self.n_embd, self.n_head, self.n_latent, self.vocab_size
        forward = L * 3 * (2 * H * N * D) + L * 2 * H * (block_size / 2) * (N + D) + 2 * D * V
        return 3 * forward


def rope_frequencies(n_latent: int) -> torch.Tensor:
    """f_j = 1 / theta^(q(j)/N) / (2*pi) with q(j) = 2*floor(j/2), in float32."""
    q = (torch.arange(n_latent, dtype=torch.float32) / 2).floor() * 2
    return 1.0 / (ROPE_THETA ** (q / n_latent)) / (2 * math.pi)


def rope_angles(freqs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(T, len(freqs)) float32: p_{t,j} = 2*pi*frac(t*f_j)."""
    return (positions.to(torch.float32).unsqueeze(1) * freqs) % 1.0 * (2 * math.pi)


def rope_phases(freqs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(T, N/2) complex64: e^(i p) for each position and pair (2i, 2i+1), which share a frequency.
    By torch.polar, not cos and sin: on CPU those run in MKL's vector math library, whose first
    call in a process now and then rounds some values differently (about one process in six,
    measured), so that a run, or its resume, would not repeat bit for bit in another process."""
    angles = rope_angles(freqs[0::2], positions)
    return torch.polar(torch.ones_like(angles), angles)


def rope(a, phases):
    """Each pair (a_2i, a_2i+1), as the complex number a_2i + i a_2i+1, times its position's
    e^(i p): a_2i cos p - a_2i+1 sin p, a_2i+1 cos p + a_2i sin p, in float32 (float64 for
    float64), then in a's dtype. A low-precision a is rotated a tile of positions at a time, so
    that it makes no full-size float32 copy."""
    if a.dtype in (torch.float32, torch.float64):
        return torch.view_as_real(torch.view_as_complex(a.unflatten(-1, (-1, 2))) * phases).flatten(-2)
    r = torch.empty_like(a)
    for t0 in range(0, a.size(-2), TILE):
        t1 = min(t0 + TILE, a.size(-2))
        tile = a[..., t0:t1, :].to(torch.promote_types(a.dtype, torch.float32))
        pairs = torch.view_as_complex(tile.unflatten(-1, (-1, 2)))
        r[..., t0:t1, :] = torch.view_as_real(pairs * phases[t0:t1]).flatten(-2)
    return r


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.size(-1),), eps=LN_EPS)


def layer_norm_backward(inp: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Gradient through y = LN(inp): rstd * (g - mean(g) - y * mean(g * y)), in float32, by
    PyTorch's fused kernels (the statistics recomputed, rather than kept from forward)."""
    dtype = torch.promote_types(inp.dtype, torch.float32)
    inp, grad, shape = inp.to(dtype), grad.to(dtype), (inp.size(-1),)
    _, mean, rstd = torch.native_layer_norm(inp, shape, None, None, LN_EPS)
    return torch.ops.aten.native_layer_norm_backward(grad, inp, shape, mean, rstd, None, None, [True, False, False])[0]


def causal_scores(r: torch.Tensor) -> torch.Tensor:
    """strictly_lower(r @ rᵀ), computing only the tiles on or below the diagonal."""
    T = r.size(-2)
    scores = r.new_zeros(*r.shape[:-1], T)
    for i0 in range(0, T, TILE):
        i1 = min(i0 + TILE, T)
        scores[..., i0:i1, :i1] = r[..., i0:i1, :] @ r[..., :i1, :].transpose(-1, -2)
    return scores.tril_(-1)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as 1 bit per element (uint8), to keep dropout masks 8x smaller. Eight shifted ORs,
    not a sum over each byte's 8 bits: torch.compile made that sum 40x slower than eager on CPU (BENCHMARKS.md)."""
    flat = mask.reshape(-1)
    eights = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)]).view(-1, 8).to(torch.uint8)
    packed = eights[:, 0]
    for bit in range(1, 8):
        packed = packed | (eights[:, bit] << bit)
    return packed


def unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    bits = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    return bits.view(-1)[:math.prod(shape)].view(shape).bool()


def unpack_4bit(codes: torch.Tensor, absmax: torch.Tensor, code_book: torch.Tensor, shape, blocksize: int,
                dtype=torch.float32):
    """Weights stored in 4 bits (an export with --4bit): codes two per byte, the first in the high
    nibble; a float32 scale per block of `blocksize` values; value = code_book[code] x its block's
    scale, computed in float32 (the same arithmetic as bitsandbytes' dequantize_4bit, so the same
    values) and returned in `dtype`. It lives here because the Hugging Face export ships model.py
    alone (hf/modeling_bdh.py), without bitsandbytes."""
    numel = math.prod(shape)
    index = torch.stack([codes.view(-1) >> 4, codes.view(-1) & 15], dim=-1).view(-1)[:numel].long()
    values = nn.functional.pad(code_book.float()[index], (0, (-numel) % blocksize)).view(-1, blocksize)
    return (values * absmax.float()[:, None]).view(-1)[:numel].view(shape).to(dtype)


class Matmuls:
    """The layer's weight products, batched over heads: a (H or 1, M, K) @ b (H, K, N) -> (H, M, N).
    `role` names the GEMM as a linear layer's would be named: "output" (forward), "grad_input"
    and "grad_weight" (backward), for backends that treat them differently (fp8.FP8Matmuls).
    This one runs torch.matmul (which broadcasts the shared 1 of a over the heads) in the autocast dtype."""

    def product(self, a, b, role="output"):
        return torch.matmul(a, b)

    def accumulate(self, total, a, b):
        """total += a @ b, a weight gradient. Under autocast the product is low precision and the
        sum float32, as autograd would accumulate a shared weight's gradient."""
        if a.dtype == b.dtype == total.dtype:
            total.baddbmm_(a, b)
        else:
            total += self.product(a, b, "grad_weight")


PLAIN = Matmuls()


def layer_forward(x, encoder, encoder_v, decoder, phases, drop=None, dropout=0.0, matmuls=PLAIN,
                  state=None, observe=None):
    """One BDH layer on x (B, T, D), computed head-first: per-head tensors are laid out
    (H, B*T, N), so every weight product is one batched matmul.

        a = relu(x @ encoder)                                  (H, B, T, N)
        y_kv = strictly_lower(rope(a) rope(a)ᵀ) @ x            (H, B, T, D)
        b = relu(LN(y_kv) @ encoder_v)                         (H, B, T, N)
        out = LN(x + LN(sum_h dropout(a * b)_h @ decoder_h))   (B, T, D)

    In MODEL.md's names: scores is A, y_kv is A @ x before its LN (MODEL.md's y = LN(y_kv)), m_pre is
    m before its LN. Dropout's mask is applied to a * b, its 1/(1 - p) scale to m_pre, after the
    decoder: the same function, since the decoder is linear, on a tensor H*N/D times smaller.

    `state` (H, B, N, D), for generation: sum_s rope(a_s) x_sᵀ over the positions before this
    chunk. rope(a) @ state is added to y_kv (the earlier positions' part of the attention), then
    the chunk's own rope(a)ᵀ x is added to the state. The state and its products are float32 whatever
    the weights' dtype or autocast: a bfloat16 sum over thousands of positions would drift from the
    parallel form's.
    `observe(a, b)`, if given, sees the two sparse latents: a (H, B, T, N) and b (H, B*T, N) (b is
    overwritten right after: copy it to keep it).
    Returns out and what backward needs: a and small tensors."""
    (B, T, D), (H, _, N) = x.shape, encoder.shape
    a = matmuls.product(x.view(1, B * T, D), encoder).relu_().view(H, B, T, N)  # x is shared by the heads
    r = rope(a, phases)
    scores = causal_scores(r)  # (H, B, T, T)
    y_kv = scores @ x
    if state is not None:  # in float32 (autocast would take the products back to the compute dtype)
        with torch.autocast(x.device.type, enabled=False):
            y_kv += (r.to(state.dtype) @ state).to(y_kv.dtype)
            state += r.transpose(-1, -2).to(state.dtype) @ x.to(state.dtype)
    b = matmuls.product(layer_norm(y_kv).view(H, B * T, D), encoder_v).relu_()
    if observe is not None:
        observe(a, b)
    z = b.mul_(a.view(H, B * T, N))
    if drop is not None:
        z.masked_fill_(drop, 0.0)
    m_pre = matmuls.product(z, decoder.view(H, N, D)).sum(0).view(B, T, D)  # concat_heads(z) @ decoder
    if drop is not None:
        # nn.Dropout's rescaling, on the small side (the LayerNorm next all but cancels it: kept, so that the
        # function is the reference's)
        m_pre = m_pre * (1.0 / (1.0 - dropout))
    s = x + layer_norm(m_pre)
    return layer_norm(s), (a, scores, y_kv, m_pre, s)


def layer_backward(grad_out, x, encoder, encoder_v, decoder, phases, drop, dropout, matmuls, saved, grads):
    """Gradient of layer_forward: returns the gradient for x, adds the weight gradients into
    grads (encoder, encoder_v, decoder-shaped (H, N, D) buffers) in place."""
    a4, scores, y_kv, m_pre, s = saved
    (B, T, D), (H, _, N) = x.shape, encoder.shape
    a = a4.view(H, B * T, N)  # a4: (H, B, T, N), as layer_forward saved it; a: its (H, B*T, N) view
    grad_encoder, grad_encoder_v, grad_decoder = grads

    # out = LN(s), s = x + LN(m_pre), m_pre = sum_h z_h @ decoder_h
    grad_s = layer_norm_backward(s, grad_out)
    grad_m_pre = layer_norm_backward(m_pre, grad_s).view(1, B * T, D).expand(H, -1, -1)
    if drop is not None:
        grad_m_pre = grad_m_pre * (1.0 / (1.0 - dropout))
    y = layer_norm(y_kv).view(H, B * T, D)
    b = matmuls.product(y, encoder_v).relu_()  # recomputed: cheaper in memory than keeping it
    z = a.new_empty(H, B * T, min(CHUNK, N))
    for n0 in range(0, N, CHUNK):  # grad_decoder += zᵀ grad_m_pre, z = a * b made a slice at a time
        n1 = min(n0 + CHUNK, N)
        z_slice = torch.mul(a[..., n0:n1], b[..., n0:n1], out=z[..., :n1 - n0])
        if drop is not None:
            z_slice.masked_fill_(drop[..., n0:n1], 0.0)
        matmuls.accumulate(grad_decoder[:, n0:n1], z_slice.transpose(-1, -2), grad_m_pre)
    del z, z_slice
    grad_z = matmuls.product(grad_m_pre, decoder.view(H, N, D).transpose(-1, -2), "grad_input")  # (H, B*T, N)
    if drop is not None:
        grad_z.masked_fill_(drop, 0.0)
    grad_v = grad_z * a  # through z = a * b ...
    torch.ops.aten.threshold_backward.grad_input(grad_v, b, 0.0, grad_input=grad_v)  # ... and b = relu(v), v = y @ encoder_v
    grad_a = b.mul_(grad_z)  # b is not needed after this: reuse its memory
    del b, grad_z
    matmuls.accumulate(grad_encoder_v, y.transpose(-1, -2), grad_v)
    grad_y = matmuls.product(grad_v, encoder_v.transpose(-1, -2), "grad_input")
    grad_y_kv = layer_norm_backward(y_kv, grad_y.view(H, B, T, D))
    del grad_v, grad_y

    # y_kv = scores @ x with scores = strictly_lower(r rᵀ), r = rope(a)
    grad_scores = (grad_y_kv @ x.transpose(-1, -2)).tril_(-1)  # (H, B, T, T)
    grad_x = grad_s + (scores.transpose(-1, -2) @ grad_y_kv).sum(0)
    r = rope(a4, phases).view(H * B, T, N)
    grad_scores = grad_scores.view(H * B, T, T)
    grad_a4 = grad_a.view(H, B, T, N)
    grad_r = a.new_empty(H * B, min(TILE, T), N)  # reused by every tile
    for i0 in range(0, T, TILE):  # grad_r = grad_scores @ r + grad_scoresᵀ @ r, by row tile
        i1 = min(i0 + TILE, T)
        g = torch.bmm(grad_scores[:, i0:i1, :i1], r[:, :i1], out=grad_r[:, :i1 - i0])
        g.baddbmm_(grad_scores[:, i0:, i0:i1].transpose(-1, -2), r[:, i0:])
        # rope is a rotation: its transpose rotates by the opposite phase
        grad_a4[..., i0:i1, :] += rope(g, phases[i0:i1].conj()).view(H, B, i1 - i0, N)
    del r, grad_r
    grad_u = torch.ops.aten.threshold_backward.grad_input(grad_a, a, 0.0, grad_input=grad_a)  # a = relu(x @ encoder)
    matmuls.accumulate(grad_encoder, x.view(1, B * T, D).transpose(-1, -2).expand(H, -1, -1), grad_u)
    return grad_x + matmuls.product(grad_u, encoder.transpose(-1, -2), "grad_input").sum(0).view(B, T, D)


class LayerStack(torch.autograd.Function):
    """All n_layer layers as one autograd Function. The layers share their weights, so backward
    accumulates the three weight gradients in place across layers (no per-layer gradient
    tensors to allocate and add). Between forward and backward each layer keeps a, its dropout
    mask as bits and small tensors; with recompute, only its input and the dropout bits (backward
    runs layer_forward again)."""

    @staticmethod
    def forward(ctx, x, encoder, encoder_v, decoder, phases, n_layer, dropout, recompute, matmuls, observe):
        (B, T, _), (H, _, N) = x.shape, encoder.shape
        saved = []
        for _ in range(n_layer):
            drop = torch.rand(H, B * T, N, device=x.device) < dropout if dropout > 0 else None
            out, layer_saved = layer_forward(x, encoder, encoder_v, decoder, phases, drop, dropout, matmuls,
                                             observe=observe)
            saved += [x, None if drop is None else pack_bits(drop),
                      *((None,) * len(layer_saved) if recompute else layer_saved)]
            x = out
        ctx.per_layer = len(saved) // n_layer  # x, the dropout bits, layer_forward's tensors
        ctx.n_layer, ctx.dropout, ctx.recompute, ctx.matmuls = n_layer, dropout, recompute, matmuls
        ctx.autocast = (x.device.type, torch.is_autocast_enabled(x.device.type),
                        torch.get_autocast_dtype(x.device.type))
        ctx.save_for_backward(encoder, encoder_v, decoder, phases, *saved)
        return x

    @staticmethod
    def backward(ctx, grad_out):
        device_type, autocast_enabled, autocast_dtype = ctx.autocast
        encoder, encoder_v, decoder, phases, *saved = ctx.saved_tensors
        (H, D, N), dropout, matmuls = encoder.shape, ctx.dropout, ctx.matmuls
        grads = [torch.zeros_like(encoder), torch.zeros_like(encoder_v),
                 decoder.new_zeros(H, N, D)]  # decoder's gradient, per head
        grad_x = grad_out
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_enabled):
            for layer in reversed(range(ctx.n_layer)):
                x, drop_bits, *layer_saved = saved[layer * ctx.per_layer:(layer + 1) * ctx.per_layer]
                B, T, _ = x.shape
                drop = None if drop_bits is None else unpack_bits(drop_bits, (H, B * T, N))
                if ctx.recompute:
                    _, layer_saved = layer_forward(x, encoder, encoder_v, decoder, phases, drop, dropout, matmuls)
                grad_x = layer_backward(grad_x, x, encoder, encoder_v, decoder, phases, drop, dropout,
                                        matmuls, layer_saved, grads)
                del layer_saved
        return grad_x, grads[0], grads[1], grads[2].view(H * N, D), None, None, None, None, None, None


class BDH(nn.Module):
    def __init__(self, config: BDHConfig):
        super().__init__()
        self.config = config
        D, H, N, V = config.n_embd, config.n_head, config.n_latent, config.vocab_size
        self.embed = nn.Embedding(V, D)
        self.encoder = nn.Parameter(torch.empty(H, D, N))
        self.encoder_v = nn.Parameter(torch.empty(H, D, N))
        self.decoder = nn.Parameter(torch.empty(H * N, D))
        self.lm_head = nn.Parameter(torch.empty(D, V))
        self.activation_checkpointing = False  # set by train.py from training.activation_checkpointing
        # The weight products of training steps; fp8.FP8Matmuls runs them as FP8 GEMMs. Evaluation
        # and generation always use PLAIN, in the compute dtype.
        self.matmuls = PLAIN
        # What the layers see of (encoder, encoder_v, decoder): None uses them as they are;
        # lowbit.quantization_aware_view gives their 4-bit round trip, lowbit.to_4bit 4-bit storage.
        self.weight_view = None
        self.register_buffer("rope_freqs", rope_frequencies(N), persistent=False)  # float32 always (_apply)
        # The original implementation stored its RoPE table as "attn.freqs"; it is derived
        # from the config, so drop it and let such state_dicts load unchanged.
        self.register_load_state_dict_pre_hook(self._drop_derived_buffers)
        for p in (self.embed.weight, self.encoder, self.encoder_v, self.decoder, self.lm_head):
            nn.init.normal_(p, mean=0.0, std=0.02)

    @staticmethod
    def _drop_derived_buffers(module, state_dict, prefix, *args):
        state_dict.pop(prefix + "attn.freqs", None)

    def _apply(self, fn, recurse=True):
        """.to(), .cuda(), .bfloat16(), ... as for any module; the RoPE frequencies are then
        derived again in float32 where they now are: .to(bfloat16) would round them (phases off by radians)."""
        super()._apply(fn, recurse)
        self.rope_freqs = rope_frequencies(self.config.n_latent).to(self.rope_freqs.device)
        return self

    def layer_weights(self):
        weights = tuple(getattr(self, name) for name in LAYER_WEIGHTS)
        return weights if self.weight_view is None else self.weight_view(weights)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, observe=None):
        """Logits (B, T, V) and the loss against targets (None without). observe(a, b) is called
        by every layer in turn with its sparse latents (layer_forward)."""
        dropout, matmuls = (self.config.dropout, self.matmuls) if self.training else (0.0, PLAIN)
        recompute = self.activation_checkpointing or not torch.is_grad_enabled()  # (no backward: nothing to keep)
        x = parallel_forward(self, idx, self.layer_weights(), dropout, recompute, matmuls, observe)
        logits = x @ self.lm_head
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    # ------------------------------------------------------------------ generation

    @staticmethod
    def sample_next(logits, temperature, top_k, generator):
        """One token per row from (B, V) logits; temperature 0 means greedy."""
        if temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits.float()
        # at least float32's smallest normal: CUDA divides by a scalar as a product with its float32
        # reciprocal, which overflows to inf below it (and the top logit's 0 * inf is nan)
        temperature = max(temperature, torch.finfo(torch.float32).tiny)
        logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # tiny temperatures: -inf, not nan
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 prompt_chunk: int = 256, vocab_limit: int | None = None) -> torch.Tensor:
        """idx (B, T) with max_new_tokens sampled tokens appended (see stream)."""
        return torch.cat([idx, *self.stream(idx, max_new_tokens, temperature, top_k, generator, prompt_chunk,
                                            vocab_limit)], dim=1)

    @torch.no_grad()
    def stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
               top_k: int | None = None, generator: torch.Generator | None = None,
               prompt_chunk: int = 256, vocab_limit: int | None = None):
        """The max_new_tokens tokens sampled after idx (B, T), each (B, 1) as soon as it is drawn. The
        prompt is consumed in parallel chunks, then each new token costs one recurrent step, whatever
        the context length. vocab_limit: sample only ids below it (the tokenizer's; vocab_size may be padded)."""
        config = self.config
        B, T = idx.shape
        if T == 0:
            raise ValueError("generation needs at least one prompt token (sample.py starts an empty prompt with the "
                             "document separator)")
        states = empty_states(config, B, idx.device)
        weights = self.layer_weights()  # 4-bit modes: quantized or dequantized once per call
        for t0 in range(0, T, prompt_chunk):
            h = recurrent_forward(self, idx[:, t0:t0 + prompt_chunk], states, t0, weights)
        for t in range(T, T + max_new_tokens):
            token = self.sample_next(h[:, -1] @ self.lm_head[:, :vocab_limit], temperature, top_k, generator)
            yield token
            if t + 1 < T + max_new_tokens:
                h = recurrent_forward(self, token, states, t, weights)


def empty_states(config: BDHConfig, batch: int, device) -> list:
    """Each layer's generation state (H, B, N, D) before the first position: float32 whatever the
    weights' dtype (layer_forward)."""
    return [torch.zeros(config.n_head, batch, config.n_latent, config.n_embd, device=device)
            for _ in range(config.n_layer)]


def parallel_forward(model, tokens: torch.Tensor, weights, dropout=0.0, recompute=False, matmuls=PLAIN,
                     observe=None) -> torch.Tensor:
    """The final hidden states (B, T, D) of tokens (B, T) from position 0: the parallel form, for
    training (LayerStack's backward). `model` holds BDH's parameters (a BDH, or the Hugging Face
    export's model); `weights`: its (encoder, encoder_v, decoder) as the layers see them."""
    phases = rope_phases(model.rope_freqs, torch.arange(tokens.size(1), device=tokens.device))
    x = layer_norm(model.embed(tokens))  # (B, T, D): one stream shared by all heads
    return LayerStack.apply(x, *weights, phases, model.config.n_layer, dropout, recompute, matmuls, observe)


def recurrent_forward(model, tokens: torch.Tensor, states: list, t0: int, weights: tuple) -> torch.Tensor:
    """The final hidden states (B, c, D) of tokens (B, c) at positions t0.., given each layer's
    state (H, B, N, D) = sum of rope(a_s) x_sᵀ over the earlier positions, which it updates: the
    recurrent form, a chunk at a time. `model` holds BDH's parameters (a BDH, or the Hugging Face
    export's model); `weights`: the (encoder, encoder_v, decoder) to use, its own or a 4-bit view of them."""
    phases = rope_phases(model.rope_freqs, torch.arange(t0, t0 + tokens.size(1), device=tokens.device))
    x = layer_norm(model.embed(tokens))
    for state in states:
        x, _ = layer_forward(x, *weights, phases, state=state)
    return x
