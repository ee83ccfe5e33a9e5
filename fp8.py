"""FP8 training (low_precision.use_fp8): the three weight matmuls of every layer run as FP8 GEMMs.

Backend torchao (torchao.float8, the training recipe behind its Float8Linear): each GEMM casts its
operands to FP8 with dynamic scales (the current amax of the tensor: per tensor for the
tensorwise recipe, per row for rowwise) and runs torch._scaled_mm, forward (input x weight) and
backward (grad x weight, input x grad). fp8.format picks the gradient type: hybrid = E4M3
activations and weights, E5M2 gradients; e4m3 = E4M3 everywhere.

What stays in the compute dtype (low_precision.compute_dtype, via autocast): the T x T attention
products (r rᵀ and its product with x), LayerNorm, RoPE, and lm_head (V = 256 columns: a small
GEMM that FP8 would not speed up, and the logits are where FP8 error would hurt most).
Evaluation and generation use the ordinary model in the compute dtype; the checkpoint holds the
canonical float32 weights, so an FP8-trained model loads anywhere.

The layer math is BDH_SPEC.md's, written with 2-D GEMMs (FP8 GEMMs take matrices): the encoder
for all heads at once as (D, H*N), encoder_v per head, the decoder as (H*N, D). The shared
weights stay shared: one parameter each, used by every layer; dynamic scaling keeps no state, so
each use derives its scale from the same weight.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model import layer_norm, rope_cos_sin
from reference import rope  # the autograd-friendly form; model.rope writes into reused buffers

MIN_CAPABILITY = (8, 9)  # Ada, Hopper, Blackwell: FP8 tensor cores


class FP8Error(Exception):
    pass


def check_device(device: torch.device):
    """One line naming what was found, if this device cannot run FP8 GEMMs in hardware."""
    if device.type != "cuda":
        raise FP8Error(f"low_precision.use_fp8 needs a CUDA GPU with compute capability >= 8.9 (Ada, "
                       f"Hopper, Blackwell); this run's device is {device.type}. Set "
                       f"low_precision.use_fp8=false")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise FP8Error(f"low_precision.use_fp8 needs compute capability >= 8.9 (Ada, Hopper, "
                       f"Blackwell); {torch.cuda.get_device_name(device)} has "
                       f"{capability[0]}.{capability[1]}. Set low_precision.use_fp8=false")


def torchao_matmul(fp8_cfg):
    """(matmul(x, w) running x @ w as an FP8 GEMM with autograd, description of the recipe)."""
    try:
        from torchao.float8 import CastConfig, Float8LinearConfig, LinearMMConfig, ScaledMMConfig
        from torchao.float8.float8_linear import matmul_with_hp_or_float8_args
    except ImportError as e:
        raise FP8Error(f"fp8.backend torchao: cannot import torchao.float8 ({e}); "
                       f"pip install -r requirements.txt")
    if fp8_cfg.torchao_recipe == "tensorwise":
        grad_dtype = torch.float8_e5m2 if fp8_cfg.format == "hybrid" else torch.float8_e4m3fn
        config = Float8LinearConfig(cast_config_input=CastConfig(target_dtype=torch.float8_e4m3fn),
                                    cast_config_weight=CastConfig(target_dtype=torch.float8_e4m3fn),
                                    cast_config_grad_output=CastConfig(target_dtype=grad_dtype))
    else:
        config = Float8LinearConfig.from_recipe_name(fp8_cfg.torchao_recipe)
    gemm = [ScaledMMConfig(config.emulate, c.use_fast_accum, False, config.pad_inner_dim)
            for c in (config.gemm_config_output, config.gemm_config_grad_input, config.gemm_config_grad_weight)]
    mm_config = LinearMMConfig(*gemm)

    def matmul(x, w):
        return matmul_with_hp_or_float8_args.apply(x, w, mm_config, config)

    casts = ",".join(f"{name}:{c.short_str()}" for name, c in (
        ("input", config.cast_config_input), ("weight", config.cast_config_weight),
        ("grad", config.cast_config_grad_output)))
    return matmul, f"torchao {fp8_cfg.torchao_recipe} ({casts})"


class FP8BDH(nn.Module):
    """Runs `model`'s forward with FP8 weight GEMMs; holds no parameters of its own beyond the
    model's (model.state_dict() stays the checkpoint format). Honors the model's
    activation_checkpointing (each layer recomputed in backward from its input)."""

    def __init__(self, model, matmul):
        super().__init__()
        self.model = model
        self.matmul = matmul

    def forward(self, idx, targets=None):
        m, C = self.model, self.model.config
        (B, T), D, H, N = idx.shape, C.n_embd, C.n_head, C.n_latent
        on = torch.is_autocast_enabled(idx.device.type)
        compute_dtype = torch.get_autocast_dtype(idx.device.type) if on else torch.float32
        cos, sin = rope_cos_sin(m.rope_freqs, torch.arange(T, device=idx.device))
        encoder, encoder_v, decoder = m.matmul_weights()
        encoder_all_heads = encoder.permute(1, 0, 2).reshape(D, H * N)  # column h*N + j: head h, latent j
        x = layer_norm(m.embed(idx)).to(compute_dtype)  # (B, T, D)
        for _ in range(C.n_layer):
            args = (x, encoder_all_heads, encoder_v, decoder, cos, sin, compute_dtype)
            if m.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(self.layer, *args, use_reentrant=False)
            else:
                x = self.layer(*args)
        logits = x @ m.lm_head.to(compute_dtype)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))

    def layer(self, x, encoder_all_heads, encoder_v, decoder, cos, sin, compute_dtype):
        C = self.model.config
        (B, T, D), H, N = x.shape, C.n_head, C.n_latent
        a = F.relu(self.matmul(x.reshape(B * T, D), encoder_all_heads))  # (B*T, H*N): FP8
        a = a.view(B, T, H, N).transpose(1, 2)  # (B, H, T, N)
        r = rope(a, cos, sin)
        scores = (r @ r.transpose(-1, -2)).tril(diagonal=-1)  # (B, H, T, T), compute dtype
        y = layer_norm(scores @ x.unsqueeze(1)).to(compute_dtype)  # (B, H, T, D)
        b = torch.stack([self.matmul(y[:, h].reshape(B * T, D), encoder_v[h]).view(B, T, N)
                         for h in range(H)], dim=1)  # (B, H, T, N): FP8, one GEMM per head
        z = a * F.relu(b)
        z = F.dropout(z, C.dropout, training=self.model.training)
        z = z.transpose(1, 2).reshape(B * T, H * N)  # concat_heads, head-major
        m = layer_norm(self.matmul(z, decoder).view(B, T, D))  # decoder: FP8
        return layer_norm(x + m).to(compute_dtype)


def fp8_model(model, cfg, device) -> tuple[FP8BDH, str]:
    """The FP8 training module for `model`, after checking the device and the backend."""
    check_device(device)
    if cfg.fp8.backend == "transformer_engine":
        raise FP8Error("fp8.backend transformer_engine: not implemented in this version (its "
                       "te.Linear owns its weight, and BDH's encoder is one (H, D, N) tensor "
                       "shared by every layer); use fp8.backend=torchao")
    matmul, recipe = torchao_matmul(cfg.fp8)
    return FP8BDH(model, matmul), recipe
