"""4-bit: an AdamW whose moments are stored in 4 bits, and 4-bit weights (training and serving).

Both use bitsandbytes' blockwise 4-bit quantization (quantize_4bit / dequantize_4bit): each block
of BLOCKSIZE consecutive values is divided by its absolute maximum and rounded to the nearest of
16 levels, the nf4 or fp4 code book (low_precision.quantization_type). With use_double_quant the
per-block maxima are themselves quantized to 8 bits.

AdamW4bit (low_precision.use_4bit_optimizer) keeps, per parameter, the first moment m and the
fourth root of the second moment, w = v^(1/4), each as 4-bit codes in blocks of
OPTIMIZER_BLOCKSIZE, and does every update in float32: dequantize, update, requantize. Why v^(1/4),
and why a floor:
- v spans many orders of magnitude within a block, and a non-negative value uses only the 8
  non-negative levels of the code book. w spans a quarter of v's range (in log scale), so the
  update's denominator sqrt(v) = w^2 keeps its small values: stored as sqrt(v) itself, everything
  below 4% of its block's maximum was lost, and on configs/tiny.yaml the final loss was 3% worse
  than AdamW's (1.3% with w, with blocks of 32 rather than 64; BENCHMARKS.md).
- A value below half the smallest non-zero level of its block (for nf4, 0.08 x the block maximum)
  still rounds to 0, and m / (0 + eps) would be a step a million times too large. So a
  dequantized w is never taken below the smallest non-zero level times its block's maximum: a tiny
  second moment is overestimated, which shortens that element's step instead of exploding it.
Parameters with fewer than MIN_QUANTIZED_NUMEL elements keep float32 moments (their states are too
small to matter), which makes the update exactly torch's AdamW for them.

use_4bit (quantization-aware training): under quantization_aware_view the forward pass uses the
4-bit round trip of encoder, encoder_v and decoder (the weights that hold nearly all parameters),
with a straight-through gradient to the float32 master weights. train.py applies it to the steps
after low_precision.qat_start_fraction x max_iters and to every evaluation. to_4bit() packs those
weights for serving.
"""
import logging
import math

import torch

from model import LAYER_WEIGHTS

BLOCKSIZE = 64  # weights (use_4bit, sample.py --4bit): the usual bitsandbytes block
OPTIMIZER_BLOCKSIZE = 32
MIN_QUANTIZED_NUMEL = 4096


class LowBitError(Exception):
    pass


def _bnb():
    # its CPU backend warns at import about an optional kernel package for 4-bit matmuls; this
    # module dequantizes and never calls those
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as e:
        raise LowBitError(f"low_precision: the 4-bit modes need bitsandbytes ({e}); "
                          f"pip install -r requirements.txt")
    return bnb_functional


def quantize_4bit(x: torch.Tensor, quant_type: str, double_quant: bool, blocksize: int = BLOCKSIZE):
    """bitsandbytes' (codes, QuantState) of x, in float32."""
    return _bnb().quantize_4bit(x.detach().float().contiguous(), blocksize=blocksize,
                                compress_statistics=double_quant, quant_type=quant_type)


def quantize(x: torch.Tensor, quant_type: str, double_quant: bool, blocksize: int = BLOCKSIZE) -> dict:
    """4-bit codes and the bitsandbytes quantization state, as a dict of tensors only (the
    checkpoint format: loadable with weights_only=True)."""
    codes, state = quantize_4bit(x, quant_type, double_quant, blocksize)
    return {"codes": codes, **state.as_dict(packed=True)}


def dequantize(q: dict, device=None) -> torch.Tensor:
    """The float32 values of quantize(x), flattened."""
    bnb = _bnb()
    state = bnb.QuantState.from_dict({k: v for k, v in q.items() if k != "codes"}, device or q["codes"].device)
    return bnb.dequantize_4bit(q["codes"], state).flatten()


def nbytes(q) -> int:
    if isinstance(q, dict):
        return sum(nbytes(v) for v in q.values())
    return q.numel() * q.element_size() if torch.is_tensor(q) else 0


def smallest_level(quant_type: str) -> float:
    """The smallest positive level of the code book (nf4: 0.0796, fp4: 0.0052)."""
    codes = quantize(torch.linspace(-1, 1, 4 * BLOCKSIZE), quant_type, False)
    levels = codes["quant_map"]
    return float(levels[levels > 0].min())


def floor_to_smallest_level(s: torch.Tensor, level: float, blocksize: int) -> torch.Tensor:
    """max(s, level x the maximum of s's block): no dequantized value is 0 unless its whole
    block is 0 (then m is 0 there too, up to the same rounding)."""
    flat = s.flatten()
    pad = (-flat.numel()) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    floor = blocks.amax(dim=1, keepdim=True) * level
    return torch.maximum(blocks, floor).flatten()[:flat.numel()].view_as(s)


class AdamW4bit(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected) with 4-bit moment storage."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 quant_type="nf4", double_quant=True):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.quant_type, self.double_quant = quant_type, double_quant
        self.level = smallest_level(quant_type)
        for group in self.param_groups:  # eagerly, so that state_bytes() is known before step 1
            for p in group["params"]:
                self._init_state(p)

    def _init_state(self, p):
        state = self.state[p]
        state["step"] = torch.tensor(0.0)
        zeros = torch.zeros_like(p, dtype=torch.float32)
        if p.numel() >= MIN_QUANTIZED_NUMEL:
            state["exp_avg_4bit"] = self._pack(zeros)
            state["exp_avg_sq_root4_4bit"] = self._pack(zeros)  # v^(1/4)
        else:
            state["exp_avg"], state["exp_avg_sq"] = zeros, zeros.clone()

    def _pack(self, x):
        return quantize(x, self.quant_type, self.double_quant, OPTIMIZER_BLOCKSIZE)

    def load_state_dict(self, state_dict):
        """torch casts every loaded state tensor to its parameter's dtype; give the 4-bit codes,
        the packed quantization state and double-quantized block maxima back their uint8."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for q in (state.get("exp_avg_4bit"), state.get("exp_avg_sq_root4_4bit")):
                if q is None:
                    continue
                uint8_keys = {"codes", "absmax"} if "nested_absmax" in q else {"codes"}
                for key in q:
                    if key in uint8_keys or key.startswith("quant_state."):
                        q[key] = q[key].to(torch.uint8)

    def state_bytes(self) -> int:
        return sum(nbytes(s) for s in self.state.values())

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "step" not in state:  # e.g. state dropped by a load
                    self._init_state(p)
                state["step"] += 1
                t = float(state["step"])
                grad = p.grad.float()
                quantized = "exp_avg_4bit" in state
                if quantized:
                    m = dequantize(state["exp_avg_4bit"], p.device).view_as(p)
                    w = dequantize(state["exp_avg_sq_root4_4bit"], p.device).view_as(p)
                    v = floor_to_smallest_level(w, self.level, OPTIMIZER_BLOCKSIZE).pow_(4)
                else:
                    m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                s = v.sqrt()
                denominator = (s / math.sqrt(1 - beta2 ** t)).add_(group["eps"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.addcdiv_(m.to(p.dtype), denominator.to(p.dtype), value=-group["lr"] / (1 - beta1 ** t))
                if quantized:
                    state["exp_avg_4bit"] = self._pack(m)
                    state["exp_avg_sq_root4_4bit"] = self._pack(s.sqrt())
        return loss


def convert_adamw_state(optimizer_state: dict, shapes: dict, to_4bit: bool, quant_type: str,
                        double_quant: bool) -> dict:
    """A saved optimizer state (keyed by parameter name) in the other format: torch AdamW's
    float32 moments <-> AdamW4bit's 4-bit codes, so that a resumed run may switch
    use_4bit_optimizer."""
    for name, state in optimizer_state["state"].items():
        if to_4bit and "exp_avg" in state and state["exp_avg"].numel() >= MIN_QUANTIZED_NUMEL:
            settings = (quant_type, double_quant, OPTIMIZER_BLOCKSIZE)
            state["exp_avg_4bit"] = quantize(state.pop("exp_avg"), *settings)
            state["exp_avg_sq_root4_4bit"] = quantize(state.pop("exp_avg_sq").pow(0.25), *settings)
        elif not to_4bit and "exp_avg_4bit" in state:
            state["exp_avg"] = dequantize(state.pop("exp_avg_4bit")).view(shapes[name])
            state["exp_avg_sq"] = dequantize(state.pop("exp_avg_sq_root4_4bit")).view(shapes[name]).pow(4)
    return optimizer_state


def adamw_state_bytes(params) -> int:
    """What torch.optim.AdamW keeps: two float32 moments per parameter (and a step count)."""
    return sum(2 * 4 * p.numel() + 4 for p in params)


class FakeQuantize4bit(torch.autograd.Function):
    """Forward: the weight after a 4-bit round trip. Backward: the gradient unchanged (straight
    through) to the float32 master weight."""

    @staticmethod
    def forward(ctx, w, quant_type, double_quant):
        codes, state = quantize_4bit(w, quant_type, double_quant)
        return _bnb().dequantize_4bit(codes, state).view_as(w).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def quantization_aware_view(quant_type: str, double_quant: bool):
    """A BDH.weight_view under which the model's matmuls use the 4-bit round trip of encoder,
    encoder_v and decoder."""
    return lambda weights: tuple(FakeQuantize4bit.apply(w, quant_type, double_quant) for w in weights)


def export_4bit(weight: torch.Tensor, quant_type: str, double_quant: bool) -> dict:
    """The layout of an export's 4-bit weights (model.unpack_4bit reads it without bitsandbytes):
    the packed codes, each block's scale in float32 (double quantization undone, so the values are
    exactly those of the 4-bit round trip) and the 16-level code book."""
    codes, state = quantize_4bit(weight, quant_type, double_quant)
    absmax = state.absmax
    if state.nested:
        absmax = _bnb().dequantize_blockwise(state.absmax, state.state2) + state.offset
    return {"nf4": codes.view(-1), "absmax": absmax.float(), "quant_map": state.code.float()}


def to_4bit(model, quant_type: str, double_quant: bool) -> tuple[int, int]:
    """Replace encoder, encoder_v and decoder by their 4-bit codes; each use dequantizes them.
    Returns (bytes of the model's weights before, after)."""
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    packed = {}
    for name in LAYER_WEIGHTS:
        weight = getattr(model, name)
        packed[name] = (quantize(weight, quant_type, double_quant), weight.shape)
        setattr(model, name, torch.nn.Parameter(weight.new_empty(0), requires_grad=False))
    model.weight_view = lambda _: tuple(dequantize(q).view(shape) for q, shape in packed.values())
    after = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        nbytes(q) for q, _ in packed.values())
    return before, after
