"""4-bit weights, for training (quantization-aware) and serving. (The 4-bit optimizer is adamw4bit.py.)

They use bitsandbytes' blockwise 4-bit quantization (quantize_4bit / dequantize_4bit): each block
of BLOCKSIZE consecutive values is divided by its absolute maximum and rounded to the nearest of
16 levels, the nf4 or fp4 code book (low_precision.quantization_type). With use_double_quant the
per-block maxima are themselves quantized to 8 bits.

use_4bit (quantization-aware training): under quantization_aware_view the forward pass uses the
4-bit round trip of encoder, encoder_v and decoder (the weights that hold nearly all parameters),
with a straight-through gradient to the float32 master weights. train.py applies it to the steps
after low_precision.qat_start_fraction x max_iters and to every evaluation. to_4bit() packs those
weights for serving.
"""
import logging

import torch

from model import LAYER_WEIGHTS
from runtime import first_line, tensor_bytes

BLOCKSIZE = 64  # weights (use_4bit, sample.py --4bit): the usual bitsandbytes block


class LowBitError(Exception):
    pass


def _bnb():
    # its CPU backend warns at import about an optional kernel package for 4-bit matmuls; this
    # module dequantizes and never calls those
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnb_functional
    except (ImportError, OSError, RuntimeError) as e:  # (OSError, RuntimeError: an install whose library fails to load)
        raise LowBitError(f"low_precision: the 4-bit modes need bitsandbytes ({first_line(e)}); "
                          f"pip install -r requirements.txt")
    return bnb_functional


def check_bitsandbytes():
    """use_4bit's package, as a run starts: its first use is the first 4-bit evaluation, perhaps hours in."""
    _bnb()


def quantize_4bit(x: torch.Tensor, quant_type: str, double_quant: bool, blocksize: int = BLOCKSIZE):
    """bitsandbytes' (codes, QuantState) of x, in float32."""
    return _bnb().quantize_4bit(x.detach().float().contiguous(), blocksize=blocksize,
                                compress_statistics=double_quant, quant_type=quant_type)


def quantize(x: torch.Tensor, quant_type: str, double_quant: bool, blocksize: int = BLOCKSIZE) -> dict:
    """4-bit codes and the bitsandbytes quantization state, as a dict of tensors only (the
    checkpoint format: loadable with weights_only=True)."""
    codes, state = quantize_4bit(x, quant_type, double_quant, blocksize)
    return {"codes": codes, **state.as_dict(packed=True)}


def dequantize(q: dict) -> torch.Tensor:
    """The float32 values of quantize(x), flattened."""
    bnb = _bnb()
    state = bnb.QuantState.from_dict({k: v for k, v in q.items() if k != "codes"}, q["codes"].device)
    return bnb.dequantize_4bit(q["codes"], state).flatten()


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
    encoder_v and decoder. bitsandbytes' kernels cannot be traced: torch.compile runs the round
    trip eagerly, between its graphs (disable says so, instead of a warning from inside bitsandbytes)."""
    return torch.compiler.disable(lambda weights: tuple(FakeQuantize4bit.apply(w, quant_type, double_quant)
                                                        for w in weights))


def export_4bit(weight: torch.Tensor, quant_type: str, double_quant: bool) -> dict:
    """The layout of an export's 4-bit weights (model.unpack_4bit reads it without bitsandbytes):
    the packed codes, each block's scale in float32 (double quantization undone, so the values are
    exactly those of the 4-bit round trip) and the 16-level code book."""
    codes, state = quantize_4bit(weight, quant_type, double_quant)
    absmax = state.absmax
    if state.nested:
        absmax = _bnb().dequantize_blockwise(state.absmax, state.state2) + state.offset
    return {"codes": codes.view(-1), "absmax": absmax.float(), "quant_map": state.code.float()}


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
        tensor_bytes(q) for q, _ in packed.values())
    return before, after


def serve_4bit_option(model, low_precision: dict, origin, four_bit: bool) -> list[str]:
    """--4bit of sample.py and neurons.py: the model's encoder, encoder_v and decoder in 4 bits (to_4bit),
    as a use_4bit run evaluated them; without it, the model as it is. Returns the notes to print: which
    weights these are, where the run trained for the others (`low_precision`: load_model's)."""
    if four_bit and low_precision.get("exported_in_4bit"):
        raise LowBitError(f"--4bit: {origin} holds 4-bit weights already (export.py --4bit): drop --4bit")
    notes = []
    # 4-bit weights quantized after training (by export.py --4bit, or --4bit here); unknown (None) for a
    # folder exported before use_4bit was recorded
    if (four_bit or low_precision.get("exported_in_4bit")) and low_precision.get("use_4bit") is False:
        notes.append(post_training_note(origin))
    elif not four_bit and not low_precision.get("exported_in_4bit") and low_precision.get("use_4bit"):
        notes.append(full_precision_note(origin, "--4bit"))
    if four_bit:
        quant_type, double_quant = low_precision["quantization_type"], low_precision["use_double_quant"]
        before, after = to_4bit(model, quant_type, double_quant)
        notes.append(f"4-bit weights ({quant_type}{', double quant' if double_quant else ''}): model "
                     f"{after / 2**20:.2f} MiB, float32 {before / 2**20:.2f} MiB (1/{before / after:.1f})")
    return notes


def full_precision_note(source, option: str) -> str:
    """For a model trained with use_4bit, used without --4bit."""
    return (f"note: {source} was trained with low_precision.use_4bit for 4-bit serving, and its evaluations measured "
            f"its 4-bit weights: add {option} for those; without it, the full-precision weights")


def post_training_note(source) -> str:
    """For --4bit on a model trained without use_4bit."""
    return (f"note: {source} was not trained with low_precision.use_4bit: its weights are quantized after training "
            f"(post-training quantization), which costs more loss than quantization-aware training")
