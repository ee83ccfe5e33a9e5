"""FP8 training (low_precision.use_fp8): the weight products of every layer run as FP8 GEMMs.

Backend torchao (torchao.float8, the training recipe behind its Float8Linear): each GEMM casts its
operands to FP8 with dynamic scales (the current amax of the tensor: per tensor for the
tensorwise recipe, per row of the contraction for rowwise) and runs torch._scaled_mm. FP8Matmuls
plugs into model.py's layer (BDH.matmuls) and runs all nine weight products of a layer in FP8:
forward (input x weight) and backward (grad x weight, input x grad) of encoder, encoder_v and
decoder, one GEMM per head. fp8.format picks the gradient type: hybrid = E4M3 activations and
weights, E5M2 gradients; e4m3 = E4M3 everywhere.

What stays in the compute dtype (low_precision.compute_dtype, via autocast): the T x T attention
products (r rᵀ and its product with x), LayerNorm, RoPE, and lm_head (V columns: a small GEMM
that FP8 would not speed up, and the logits are where FP8 error would hurt most). Evaluation and
generation use the compute dtype; checkpoints hold the canonical float32 weights, so an
FP8-trained model loads anywhere. The shared weights stay shared: one parameter each; dynamic
scaling keeps no state, so each use derives its scale from the same weight.
"""
import torch

from model import Matmuls

MIN_CAPABILITY = (8, 9)  # Ada, Hopper, Blackwell: FP8 tensor cores


class FP8Error(Exception):
    pass


def check_device(device: torch.device):
    """Raises FP8Error, one line naming what was found, if this device cannot run FP8 GEMMs in hardware."""
    if device.type != "cuda":
        raise FP8Error(f"low_precision.use_fp8 needs a CUDA GPU with compute capability >= 8.9 (Ada, "
                       f"Hopper, Blackwell); this run's device is {device.type}. Set "
                       f"low_precision.use_fp8=false")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise FP8Error(f"low_precision.use_fp8 needs compute capability >= 8.9 (Ada, Hopper, "
                       f"Blackwell); {torch.cuda.get_device_name(device)} has "
                       f"{capability[0]}.{capability[1]}. Set low_precision.use_fp8=false")


class FP8Matmuls(Matmuls):
    """model.Matmuls through torchao's FP8 matmul. torchao's training matmul casts its first
    operand as an input (scaled along its last dimension) and its second as a weight (scaled
    along its first): along the contraction, which is what every GEMM needs. So each role gets a
    torchao config whose "input" and "weight" casts are that GEMM's operands: for grad_input the
    gradient and the weight, for grad_weight the input and the gradient."""

    def __init__(self, roles: dict):
        self.roles = roles  # role -> (torchao matmul config, its linear mm config)

    def product(self, a, b, role="output"):
        from torchao.float8.float8_linear import matmul_with_hp_or_float8_args
        if torch.is_autocast_enabled(a.device.type):  # the result in the compute dtype
            dtype = torch.get_autocast_dtype(a.device.type)
            a, b = a.to(dtype), b.to(dtype)
        config, mm_config = self.roles[role]
        return torch.stack([matmul_with_hp_or_float8_args.apply(a[h if len(a) > 1 else 0], b[h], mm_config, config)
                            for h in range(b.size(0))])

    def accumulate(self, total, a, b):
        total += self.product(a, b, "grad_weight")


def torchao_matmuls(fp8_cfg) -> tuple[FP8Matmuls, str]:
    """(FP8Matmuls for fp8.torchao_recipe and fp8.format, a description of the casts)."""
    try:
        from torchao.float8 import CastConfig, Float8LinearConfig, LinearMMConfig, ScaledMMConfig
    except ImportError as e:
        raise FP8Error(f"fp8.backend torchao: cannot import torchao.float8 ({e}); "
                       f"pip install -r requirements.txt")
    if fp8_cfg.torchao_recipe == "tensorwise":
        grad_dtype = torch.float8_e5m2 if fp8_cfg.format == "hybrid" else torch.float8_e4m3fn
        recipe = Float8LinearConfig(cast_config_input=CastConfig(target_dtype=torch.float8_e4m3fn),
                                    cast_config_weight=CastConfig(target_dtype=torch.float8_e4m3fn),
                                    cast_config_grad_output=CastConfig(target_dtype=grad_dtype))
    else:
        recipe = Float8LinearConfig.from_recipe_name(fp8_cfg.torchao_recipe)
    operands = {"output": (recipe.cast_config_input, recipe.cast_config_weight, recipe.gemm_config_output),
                "grad_input": (recipe.cast_config_grad_output, recipe.cast_config_weight_for_grad_input,
                               recipe.gemm_config_grad_input),
                "grad_weight": (recipe.cast_config_input_for_grad_weight,
                                recipe.cast_config_grad_output_for_grad_weight, recipe.gemm_config_grad_weight)}
    roles = {}
    for role, (first, second, gemm) in operands.items():
        # only the "output" GEMM of this config runs; its grad_output cast is set to keep torchao's
        # consistency checks of the unused backward GEMMs satisfied
        config = Float8LinearConfig(cast_config_input=first, cast_config_weight=second, cast_config_grad_output=first,
                                    gemm_config_output=gemm, round_scales_to_power_of_2=recipe.round_scales_to_power_of_2)
        scaled_mm = ScaledMMConfig(recipe.emulate, gemm.use_fast_accum, False, recipe.pad_inner_dim)
        roles[role] = (config, LinearMMConfig(scaled_mm, scaled_mm, scaled_mm))
    casts = ",".join(f"{name}:{c.short_str()}" for name, c in (
        ("input", recipe.cast_config_input), ("weight", recipe.cast_config_weight),
        ("grad", recipe.cast_config_grad_output)))
    grad_weight = operands["grad_weight"][0].short_str()
    in_high_precision = ", weight gradients in high precision" if grad_weight.startswith("dis") else ""
    return FP8Matmuls(roles), f"torchao {fp8_cfg.torchao_recipe} ({casts}){in_high_precision}"


def fp8_matmuls(fp8_cfg, device) -> tuple[FP8Matmuls, str]:
    """The FP8 weight products for BDH.matmuls, after checking the device and the backend."""
    check_device(device)
    if fp8_cfg.backend == "transformer_engine":
        raise FP8Error("fp8.backend transformer_engine: not implemented in this version (its "
                       "te.Linear owns its weight, and BDH's encoder is one (H, D, N) tensor "
                       "shared by every layer); use fp8.backend=torchao")
    return torchao_matmuls(fp8_cfg)
