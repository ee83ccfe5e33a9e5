"""BDH ("Baby Dragon Hatchling", arXiv 2509.26507): the model, exactly as ../shared/BDH_SPEC.md.

Parameter names and shapes are the checkpoint format: embed.weight, encoder, encoder_v,
decoder, lm_head. The same encoder / encoder_v / decoder are used by every layer.

Training runs the layer stack as one autograd Function with a hand-written backward (LayerStack):
- the attention r·rᵀ is computed only in tiles on or below the diagonal, forward and backward;
- between forward and backward a layer keeps one (H, B, T, N) activation (a = relu(x @ encoder)),
  its dropout mask as bits, and (H, B, T, T) / (B, T, D)-sized tensors; everything else is
  recomputed. With activation_checkpointing it keeps only its input and recomputes the layer;
- the weights are shared by all layers, so their gradients accumulate in place across layers.
reference.py holds the straightforward implementation that the tests compare this one against.
Generation uses the recurrent form: a state of size N x D per layer and head, so each new token
costs the same whatever the context (BDH.generate).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ROPE_THETA = 2.0**16
LN_EPS = 1e-5
TILE = 64  # rows per tile of the causal attention
CHUNK = 1024  # latent columns per slice where backward avoids a full (H, B*T, N) temporary


@dataclass
class BDHConfig:
    n_layer: int = 6
    n_embd: int = 256
    dropout: float = 0.1
    n_head: int = 4
    mlp_internal_dim_multiplier: int = 128
    vocab_size: int = 256

    @property
    def n_latent(self) -> int:  # N in the spec: latent neurons per head
        return self.mlp_internal_dim_multiplier * self.n_embd // self.n_head


def rope_frequencies(n_latent: int) -> torch.Tensor:
    """f_j = 1 / theta^(q(j)/N) / (2*pi) with q(j) = 2*floor(j/2), in float32."""
    q = (torch.arange(n_latent, dtype=torch.float32) / 2).floor() * 2
    return 1.0 / (ROPE_THETA ** (q / n_latent)) / (2 * math.pi)


def rope_cos_sin(freqs: torch.Tensor, positions: torch.Tensor):
    """(T, N) float32 tables of cos and sin of p_{t,j} = 2*pi*frac(t*f_j), shared by all layers."""
    phases = (positions.to(torch.float32).unsqueeze(1) * freqs) % 1.0 * (2 * math.pi)
    return phases.cos(), phases.sin()


def rotate_pairs(a: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(a_0, a_1, a_2, a_3, ...) -> (-a_1, a_0, -a_3, a_2, ...)"""
    out = torch.empty_like(a) if out is None else out
    torch.neg(a[..., 1::2], out=out[..., 0::2])
    out[..., 1::2] = a[..., 0::2]
    return out


def rope(a, cos, sin):
    """a*cos + rotate_pairs(a)*sin: each pair (a_2i, a_2i+1) rotated by its position's phase. The
    rotated copy is made one tile of positions at a time, and the tables are cast to the
    activation dtype first, so no extra full-size or float32 copy of a is made."""
    r = a * cos
    rotated = a.new_empty(*a.shape[:-2], min(TILE, a.size(-2)), a.size(-1))  # reused by every tile
    for t0 in range(0, a.size(-2), TILE):
        t1 = min(t0 + TILE, a.size(-2))
        tile = rotate_pairs(a[..., t0:t1, :], out=rotated[..., :t1 - t0, :])
        r[..., t0:t1, :].addcmul_(tile, sin[t0:t1])
    return r


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.size(-1),), eps=LN_EPS)


def layer_norm_backward(inp: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Gradient through y = LN(inp): rstd * (g - mean(g) - y * mean(g * y)), in float32."""
    dtype = torch.promote_types(inp.dtype, torch.float32)
    inp, grad = inp.to(dtype), grad.to(dtype)
    var, mean = torch.var_mean(inp, dim=-1, keepdim=True, correction=0)
    rstd = (var + LN_EPS).rsqrt()
    y = (inp - mean) * rstd
    return rstd * (grad - grad.mean(-1, keepdim=True) - y * (grad * y).mean(-1, keepdim=True))


def causal_scores(r: torch.Tensor) -> torch.Tensor:
    """strictly_lower(r @ rᵀ), computing only the tiles on or below the diagonal."""
    T = r.size(-2)
    scores = r.new_zeros(*r.shape[:-1], T)
    for i0 in range(0, T, TILE):
        i1 = min(i0 + TILE, T)
        scores[..., i0:i1, :i1] = r[..., i0:i1, :] @ r[..., :i1, :].transpose(-1, -2)
    return scores.tril_(-1)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as 1 bit per element (uint8), to keep dropout masks 8x smaller."""
    flat = mask.reshape(-1)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)]).view(-1, 8).to(torch.uint8)
    return (flat << torch.arange(8, dtype=torch.uint8, device=mask.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    bits = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    return bits.view(-1)[:math.prod(shape)].view(shape).bool()


def layer_forward(x, encoder, encoder_v, decoder, cos, sin, drop, dropout):
    """One BDH layer on x (B, T, D), computed head-first: per-head tensors are laid out
    (H, B*T, N), so every weight matmul and weight gradient is one batched matmul.

        a = relu(x @ encoder)                                  (H, B, T, N)
        y_kv = strictly_lower(rope(a) rope(a)ᵀ) @ x            (H, B, T, D)
        b = relu(LN(y_kv) @ encoder_v)                         (H, B, T, N)
        out = LN(x + LN(sum_h dropout(a * b)_h @ decoder_h))   (B, T, D)

    Returns out and what backward needs: a and small tensors."""
    (B, T, D), (H, _, N) = x.shape, encoder.shape
    a = torch.bmm(x.view(1, B * T, D).expand(H, -1, -1), encoder).relu_().view(H, B, T, N)
    scores = causal_scores(rope(a, cos.to(a.dtype), sin.to(a.dtype)))  # (H, B, T, T)
    y_kv = scores @ x
    z = (layer_norm(y_kv).view(H, B * T, D) @ encoder_v).relu_().mul_(a.view(H, B * T, N))
    if drop is not None:
        z.masked_fill_(drop, 0.0)
    m_pre = (z @ decoder.view(H, N, D)).sum(0).view(B, T, D)  # concat_heads(z) @ decoder
    if drop is not None:
        m_pre = m_pre * (1.0 / (1.0 - dropout))  # dropout's rescaling, on the small side
    s = x + layer_norm(m_pre)
    return layer_norm(s), (a, scores, y_kv, m_pre, s)


def accumulate(total: torch.Tensor, left: torch.Tensor, right: torch.Tensor):
    """total += left @ right (batched). Under autocast the product is low precision and the
    sum float32, as autograd would accumulate a shared weight's gradient."""
    if left.dtype == right.dtype == total.dtype:
        total.baddbmm_(left, right)
    else:
        total += torch.bmm(left, right)


def layer_backward(grad_out, x, encoder, encoder_v, decoder, cos, sin, drop, dropout, saved, grads):
    """Gradient of layer_forward: returns the gradient for x, adds the weight gradients into
    grads (encoder, encoder_v, decoder-shaped (H, N, D) buffers) in place."""
    a4, scores, y_kv, m_pre, s = saved
    (B, T, D), (H, _, N) = x.shape, encoder.shape
    a = a4.view(H, B * T, N)
    grad_encoder, grad_encoder_v, grad_decoder = grads

    # out = LN(s), s = x + LN(m_pre), m_pre = sum_h z_h @ decoder_h
    grad_s = layer_norm_backward(s, grad_out)
    grad_m_pre = layer_norm_backward(m_pre, grad_s).view(1, B * T, D).expand(H, -1, -1)
    if drop is not None:
        grad_m_pre = grad_m_pre * (1.0 / (1.0 - dropout))
    y = layer_norm(y_kv).view(H, B * T, D)
    b = (y @ encoder_v).relu_()  # recomputed: cheaper in memory than keeping it
    z = a.new_empty(H, B * T, min(CHUNK, N))
    for n0 in range(0, N, CHUNK):  # grad_decoder += zᵀ grad_m_pre, z = a * b made a slice at a time
        n1 = min(n0 + CHUNK, N)
        z_slice = torch.mul(a[..., n0:n1], b[..., n0:n1], out=z[..., :n1 - n0])
        if drop is not None:
            z_slice.masked_fill_(drop[..., n0:n1], 0.0)
        accumulate(grad_decoder[:, n0:n1], z_slice.transpose(-1, -2), grad_m_pre)
    del z, z_slice
    grad_z = torch.bmm(grad_m_pre, decoder.view(H, N, D).transpose(-1, -2))  # (H, B*T, N)
    if drop is not None:
        grad_z.masked_fill_(drop, 0.0)
    b_zero = b == 0
    grad_a = b.mul_(grad_z)  # b is not needed after this: reuse its memory
    grad_v = grad_z.mul_(a).masked_fill_(b_zero, 0.0)  # through b = relu(v), v = y @ encoder_v
    del b, b_zero
    accumulate(grad_encoder_v, y.transpose(-1, -2), grad_v)
    grad_y_kv = layer_norm_backward(y_kv, (grad_v @ encoder_v.transpose(-1, -2)).view(H, B, T, D))
    del grad_v

    # y_kv = scores @ x with scores = strictly_lower(r rᵀ), r = rope(a)
    grad_scores = (grad_y_kv @ x.transpose(-1, -2)).tril_(-1)  # (H, B, T, T)
    grad_x = grad_s + (scores.transpose(-1, -2) @ grad_y_kv).sum(0)
    cos, sin = cos.to(a.dtype), sin.to(a.dtype)
    r = rope(a4, cos, sin).view(H * B, T, N)
    grad_scores = grad_scores.view(H * B, T, T)
    grad_a4 = grad_a.view(H, B, T, N)
    grad_r, rotated = (a.new_empty(H * B, min(TILE, T), N) for _ in range(2))  # reused by every tile
    for i0 in range(0, T, TILE):  # grad_r = grad_scores @ r + grad_scoresᵀ @ r, by row tile
        i1 = min(i0 + TILE, T)
        g = torch.bmm(grad_scores[:, i0:i1, :i1], r[:, :i1], out=grad_r[:, :i1 - i0])
        g.baddbmm_(grad_scores[:, i0:, i0:i1].transpose(-1, -2), r[:, i0:])
        # rope is a rotation: its transpose rotates by the opposite phase
        grad_a4[..., i0:i1, :].addcmul_(g.view(H, B, i1 - i0, N), cos[i0:i1]).addcmul_(
            rotate_pairs(g, out=rotated[:, :i1 - i0]).view(H, B, i1 - i0, N), sin[i0:i1], value=-1)
    del r, grad_r, rotated
    grad_u = grad_a.masked_fill_(a == 0, 0.0)  # through a = relu(x @ encoder)
    accumulate(grad_encoder, x.view(1, B * T, D).transpose(-1, -2).expand(H, -1, -1), grad_u)
    return grad_x + (grad_u @ encoder.transpose(-1, -2)).sum(0).view(B, T, D)


class LayerStack(torch.autograd.Function):
    """All n_layer layers as one autograd Function. The layers share their weights, so backward
    accumulates the three weight gradients in place across layers (no per-layer gradient
    tensors to allocate and add). Between forward and backward each layer keeps a, its dropout
    mask as bits and small tensors; with checkpoint, only its input."""

    @staticmethod
    def forward(ctx, x, encoder, encoder_v, decoder, cos, sin, n_layer, dropout, checkpoint):
        (B, T, _), (H, _, N) = x.shape, encoder.shape
        saved = []
        for _ in range(n_layer):
            drop = torch.rand(H, B * T, N, device=x.device) < dropout if dropout > 0 else None
            out, layer_saved = layer_forward(x, encoder, encoder_v, decoder, cos, sin, drop, dropout)
            saved += [x, None if drop is None else pack_bits(drop),
                      *((None,) * 5 if checkpoint else layer_saved)]  # 7 entries per layer
            x = out
        ctx.n_layer, ctx.dropout, ctx.checkpoint = n_layer, dropout, checkpoint
        ctx.autocast = (x.device.type, torch.is_autocast_enabled(x.device.type),
                        torch.get_autocast_dtype(x.device.type))
        ctx.save_for_backward(encoder, encoder_v, decoder, cos, sin, *saved)
        return x

    @staticmethod
    def backward(ctx, grad_out):
        device_type, autocast_enabled, autocast_dtype = ctx.autocast
        encoder, encoder_v, decoder, cos, sin, *saved = ctx.saved_tensors
        (H, D, N), dropout = encoder.shape, ctx.dropout
        grads = [torch.zeros_like(encoder), torch.zeros_like(encoder_v),
                 decoder.new_zeros(H, N, D)]  # decoder's gradient, per head
        grad_x = grad_out
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_enabled):
            for layer in reversed(range(ctx.n_layer)):
                x, drop_bits, *layer_saved = saved[layer * 7:(layer + 1) * 7]
                B, T, _ = x.shape
                drop = None if drop_bits is None else unpack_bits(drop_bits, (H, B * T, N))
                if ctx.checkpoint:
                    _, layer_saved = layer_forward(x, encoder, encoder_v, decoder, cos, sin, drop, dropout)
                grad_x = layer_backward(grad_x, x, encoder, encoder_v, decoder, cos, sin, drop,
                                        dropout, layer_saved, grads)
                del layer_saved
        return grad_x, grads[0], grads[1], grads[2].view(H * N, D), None, None, None, None, None


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
        self.drop = nn.Dropout(config.dropout)  # reference.py's dropout; LayerStack draws its own masks
        self.activation_checkpointing = False  # set by train.py from training.activation_checkpointing
        # What the matmuls see of (encoder, encoder_v, decoder): None uses them as they are;
        # train.py sets lowbit.quantization_aware_view (4-bit round trip), lowbit.to_4bit 4-bit storage.
        self.weight_view = None
        self.register_buffer("rope_freqs", rope_frequencies(N), persistent=False)
        # The original implementation stored its RoPE table as "attn.freqs"; it is derived
        # from the config, so drop it and let such state_dicts load unchanged.
        self.register_load_state_dict_pre_hook(self._drop_derived_buffers)
        for p in (self.embed.weight, self.encoder, self.encoder_v, self.decoder, self.lm_head):
            nn.init.normal_(p, mean=0.0, std=0.02)

    @staticmethod
    def _drop_derived_buffers(module, state_dict, prefix, *args):
        state_dict.pop(prefix + "attn.freqs", None)

    def matmul_weights(self):
        weights = (self.encoder, self.encoder_v, self.decoder)
        return weights if self.weight_view is None else self.weight_view(weights)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        C = self.config
        B, T = idx.shape
        cos, sin = rope_cos_sin(self.rope_freqs, torch.arange(T, device=idx.device))
        p = C.dropout if self.training else 0.0
        x = layer_norm(self.embed(idx))  # (B, T, D): one stream shared by all heads
        x = LayerStack.apply(x, *self.matmul_weights(), cos, sin, C.n_layer, p, self.activation_checkpointing)
        logits = x @ self.lm_head
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    # ------------------------------------------------------------------ generation

    def _advance(self, x, states, t0, weights=None):
        """Run c tokens at positions t0.. (x: (B, c, D), embeddings after LN) through all layers,
        given each layer's state S = sum_s r_s x_sᵀ (H, B, N, D) over the earlier positions, and
        update the states. Returns the final hidden states (B, c, D). `weights`: matmul_weights(),
        taken once per generate() call."""
        C = self.config
        (B, c, D), H, N = x.shape, C.n_head, C.n_latent
        cos, sin = rope_cos_sin(self.rope_freqs, torch.arange(t0, t0 + c, device=x.device))
        encoder, encoder_v, decoder = weights or self.matmul_weights()
        for layer in range(C.n_layer):
            a = (x.reshape(B * c, D) @ encoder).relu_().view(H, B, c, N)
            r = rope(a, cos.to(a.dtype), sin.to(a.dtype))
            y_kv = r @ states[layer] + causal_scores(r) @ x  # earlier positions + this chunk
            states[layer] += r.transpose(-1, -2) @ x
            z = (layer_norm(y_kv).view(H, B * c, D) @ encoder_v).relu_().mul_(a.view(H, B * c, N))
            x = layer_norm(x + layer_norm((z @ decoder.view(H, N, D)).sum(0).view(B, c, D)))
        return x

    @staticmethod
    def sample_next(logits, temperature, top_k, generator):
        """One token per row from (B, V) logits; temperature 0 means greedy."""
        logits = logits.float()
        if temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 prompt_chunk: int = 256) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx (B, T). The prompt is consumed in parallel
        chunks, then each new token costs one recurrent step, whatever the context length."""
        C = self.config
        B, T = idx.shape
        states = [torch.zeros(C.n_head, B, C.n_latent, C.n_embd, device=idx.device,
                              dtype=self.encoder.dtype) for _ in range(C.n_layer)]
        x = layer_norm(self.embed(idx))
        weights = self.matmul_weights()  # 4-bit modes: quantized or dequantized once per call
        for t0 in range(0, T, prompt_chunk):
            h = self._advance(x[:, t0:t0 + prompt_chunk], states, t0, weights)
        out = [idx]
        for t in range(T, T + max_new_tokens):
            logits = h[:, -1] @ self.lm_head
            token = self.sample_next(logits, temperature, top_k, generator)
            out.append(token)
            if t + 1 < T + max_new_tokens:
                h = self._advance(layer_norm(self.embed(token)), states, t, weights)
        return torch.cat(out, dim=1)
