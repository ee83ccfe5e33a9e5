"""AdamW with its two moments stored in 4 bits (low_precision.use_4bit_optimizer), and make_optimizer,
which gives a run this one or torch's AdamW.

Each moment is kept as 4-bit codes: the tensor is cut into blocks of `block_size` consecutive
values, each block is divided by a scale (kept in float32), and each value is rounded to the nearest
of 16 levels of a code book. The scale is the block's value of largest magnitude, sign included, so
that this value is the level +1 whatever its sign: the dynamic code book goes from -0.8875 to +1, and
an absolute maximum (torchao's scale) would shrink a block's largest negative m by 11% at every step,
to 0.44 of its value under a steady gradient. Every update runs in float32: decode, update,
encode, a piece of PIECE_NUMEL elements at a time. The format is a MomentFormat; the default is the
one the ablations in BENCHMARKS.md ("4-bit optimizer: what costs, what helps") chose:
- the first moment m in blocks of 128 with a signed dynamic code book (levels spaced by decades:
  dense near 0, where most of a block's m lies next to its maximum);
- the fourth root of the second moment, w = v^(1/4), in blocks of 128 with the zero-free linear code
  book 1/16, 2/16, ..., 1. Stored as w, v's values far below their block's maximum keep their size
  (w spans a quarter of v's range in log scale), and as no level is 0, w is never decoded as 0:
  sqrt(v) = w^2 is at least 1/256 of its block's largest, so m / (sqrt(v) + eps) cannot blow up.
Li et al. 2023 ("Memory Efficient Optimizers with 4-bit States"), and torchao.optim.AdamW4bit after
them, store v itself with that code book, which rounds every v below 1/32 of its block's maximum up
and shortens those steps: on configs/tiny.yaml it was behind this format on every seed of the built-in
corpus and level with it on tinyshakespeare (BENCHMARKS.md).
Parameters with fewer than MIN_QUANTIZED_NUMEL elements keep float32 moments (their states are too
small to matter), which makes the update exactly torch's AdamW for them.
"""
import math
from dataclasses import dataclass

import torch

from lowbit import quantize
from runtime import tensor_bytes

MIN_QUANTIZED_NUMEL = 4096
# elements of a 4-bit moment decoded, updated and encoded at a time: the float32 temporaries of a step take a few
# times 4 MiB, not a few times the largest weight (a third of the model's), which made the peak more than AdamW's
PIECE_NUMEL = 1 << 20


@dataclass(frozen=True)
class MomentFormat:
    """How AdamW4bit stores its moments. A code of None keeps that moment in float32."""
    m_code: str | None = "dynamic"  # dynamic (signed) | nf4 | fp4
    v_code: str | None = "linear"  # linear or log (zero-free, unsigned) | nf4 | fp4 | dynamic
    v_form: str = "root4"  # what is stored of the second moment: v, sqrt (v^1/2) or root4 (v^1/4)
    block_size: int = 128
    floor: bool = False  # decode v's form no lower than the code book's smallest positive level x the block scale
    rank1: bool = False  # v's scale: min(row max, column max) of the (-1, last dim) matrix, not per block
    signed_scale: bool = True  # m's block scale: its value of largest magnitude (False: its absolute maximum)


DEFAULT_FORMAT = MomentFormat()  # what train.py's AdamW4bit uses (bench_precision's ablations set another)
# Checkpoints do not record the format: a change to this default must convert the codes saved before it, by
# the checkpoint's project version, in convert_adamw_state (as it does for the nf4 codes of earlier versions).


@torch.no_grad()
def code_book(name: str) -> torch.Tensor:
    """The 16 levels of a code book, ascending, in [-1, 1]."""
    if name == "linear":  # zero-free: 1/16, 2/16, ..., 1
        return torch.linspace(0, 1, 17)[1:]
    if name == "log":  # zero-free, the same relative precision at every magnitude: 2^-15, 2^-14, ..., 1
        return torch.pow(2.0, torch.arange(-15, 1, dtype=torch.float32))
    if name == "dynamic":  # Dettmers' dynamic map in 4 bits: a decade, then linear steps within it
        positive = []
        for k, decade in enumerate((0.01, 0.1, 1.0)):  # 1, 2 and 4 levels: midpoints of equal parts of [0.1, 1]
            edges = torch.linspace(0.1, 1, 2 ** k + 1)
            positive += ((edges[:-1] + edges[1:]) / 2 * decade).tolist()
        return torch.tensor(sorted([0.0, 1.0, *positive, *(-x for x in positive)]))
    if name in ("nf4", "fp4"):
        levels = quantize(torch.linspace(-1, 1, 256), name, False)["quant_map"]  # bitsandbytes' code books
        return levels.float().sort().values
    raise ValueError(f"unknown code book {name!r}: use linear, log, dynamic, nf4 or fp4")


def blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """x flattened, zero-padded and cut into rows of block_size."""
    return pad_to_multiple(x.flatten(), block_size).view(-1, block_size)


def pad_to_multiple(flat: torch.Tensor, multiple: int) -> torch.Tensor:
    padding = (-flat.numel()) % multiple
    return torch.nn.functional.pad(flat, (0, padding)) if padding else flat  # pad copies even when it adds nothing


def element_scales(q: dict) -> torch.Tensor:
    """The scale of each element, as (-1, block_size) rows (blocks) or as the (-1, last dim) matrix (rank1)."""
    if "row" in q:
        return torch.minimum(q["row"][:, None], q["column"][None, :])
    return q["block"][:, None]


def nearest_level(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The index (uint8) of the level nearest to each value of x, a tie going to the lower level:
    the number of midpoints between levels that lie below x. `levels` on the CPU. An evenly spaced
    code book (linear) in closed form, exact in float32 (its levels and midpoints are multiples of
    1/32); any other by bucketize, whose binary search on CPU is slower than counting the midpoints
    one at a time (half the time there; on a GPU bucketize is one kernel where counting takes 30).
    Non-finite values (a step that diverged) get other codes than bucketize would give them."""
    step = levels[1] - levels[0]
    if torch.allclose(levels.diff(), step):
        index = torch.ceil((x - levels[0].item()) / step.item() - 0.5)  # (x - first) / step, rounded half down
        return index.clamp_(0, len(levels) - 1).to(torch.uint8)
    midpoints = (levels[1:] + levels[:-1]) / 2
    if x.device.type != "cpu":
        return torch.bucketize(x, midpoints.to(x.device)).to(torch.uint8)
    index = torch.zeros(x.shape, dtype=torch.uint8)
    for midpoint in midpoints.tolist():
        index += x > midpoint
    return index


def encode(x: torch.Tensor, levels: torch.Tensor, block_size: int, rank1: bool = False, signed: bool = False) -> dict:
    """x as packed 4-bit codes (two per byte) and its scales: each block's absolute maximum (signed:
    its value of largest magnitude, sign included), or with rank1 (for a tensor of 2 or more
    dimensions) the row and column maxima of x seen as a (-1, last dim) matrix, each element's scale
    being the smaller of its row's and its column's."""
    if rank1 and x.dim() >= 2:
        matrix = x.abs().reshape(-1, x.shape[-1])
        scale = {"row": matrix.amax(dim=1), "column": matrix.amax(dim=0)}
        values = x.reshape(-1, x.shape[-1])
    else:
        values = blocks(x, block_size)
        magnitudes = values.abs()
        scale = {"block": values.gather(1, magnitudes.argmax(dim=1, keepdim=True)).squeeze(1) if signed
                 else magnitudes.amax(dim=1)}
    scales = element_scales(scale)
    normalized = values / torch.where(scales == 0, 1.0, scales)  # (a block of zeros stays zeros)
    codes = nearest_level(normalized.flatten()[:x.numel()], levels)
    codes = pad_to_multiple(codes, 2)
    return {"codes": codes[0::2] << 4 | codes[1::2], **scale}


def decode(q: dict, levels: torch.Tensor, shape: torch.Size, block_size: int) -> torch.Tensor:
    n = math.prod(shape)
    byte_levels = torch.cartesian_prod(levels, levels).to(q["codes"].device)  # a byte's two levels: high, low nibble
    values = torch.nn.functional.embedding(q["codes"].int(), byte_levels).flatten()
    if "row" in q:
        return (values[:n].view(-1, shape[-1]) * element_scales(q)).view(shape)
    values = pad_to_multiple(values[:n], block_size)
    return (values.view(-1, block_size) * q["block"][:, None]).view(-1)[:n].view(shape)


class AdamW4bit(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected) with 4-bit moment storage."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 moment_format: MomentFormat | None = None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.format = moment_format or DEFAULT_FORMAT
        self.m_levels = code_book(self.format.m_code) if self.format.m_code else None
        self.v_levels = code_book(self.format.v_code) if self.format.v_code else None
        for group in self.param_groups:  # eagerly, so that state_bytes() is known before step 1
            for p in group["params"]:
                self._init_state(p)

    def _init_state(self, p):
        state = self.state[p]
        state["step"] = torch.tensor(0.0)
        large = p.numel() >= MIN_QUANTIZED_NUMEL
        for name, levels, encoder in (("exp_avg", self.m_levels, self._encode_m),
                                      ("exp_avg_sq", self.v_levels, self._encode_v)):
            if large and levels is not None:  # (a piece at a time: float32 zeros of a whole weight pass AdamW's peak)
                pieces = [encoder(torch.zeros_like(piece_of(p, piece), dtype=torch.float32))
                          for piece in self._pieces(p)]
                state[f"{name}_4bit"] = {part: torch.cat([q[part] for q in pieces]) for part in pieces[0]}
            else:
                state[name] = torch.zeros_like(p, dtype=torch.float32)

    def _pieces(self, p) -> list:
        """The slices of p (flattened) that a step updates one at a time: about PIECE_NUMEL elements, a
        multiple of the block size and even (a piece's blocks and code bytes are its own); or [None],
        the whole tensor as it is: a small one, rank1's (its scales are the whole matrix's), one that
        is not contiguous (it has no flat view)."""
        n, whole = p.numel(), math.lcm(2, self.format.block_size)
        size = max(whole, PIECE_NUMEL // whole * whole)
        if self.format.rank1 or n <= size or not p.is_contiguous():
            return [None]
        return [slice(start, min(n, start + size)) for start in range(0, n, size)]

    def _encode_m(self, m):
        return encode(m, self.m_levels, self.format.block_size, signed=self.format.signed_scale)

    def _encode_v(self, v):
        form = {"v": v, "sqrt": v.sqrt(), "root4": v.sqrt().sqrt()}[self.format.v_form]
        return encode(form, self.v_levels, self.format.block_size, self.format.rank1)

    def _decode_m(self, q, shape):
        return decode(q, self.m_levels, shape, self.format.block_size)

    def _decode_v(self, q, shape):
        levels = self.v_levels
        form = decode(q, levels, shape, self.format.block_size)
        if self.format.floor:
            floor = decode({**q, "codes": torch.full_like(q["codes"], 0x11 * int((levels > 0).nonzero()[0]))},
                           levels, shape, self.format.block_size)  # every element at the smallest positive level
            form = torch.maximum(form, floor)
        return {"v": form, "sqrt": form.square(), "root4": form.square().square()}[self.format.v_form]

    def load_state_dict(self, state_dict):
        """torch would cast every loaded state tensor to its parameter's dtype, the 4-bit codes to
        float32 (4 times their bytes, at the moment a resume is closest to running out of memory):
        they are set aside, and put back as they are, on the parameter's device."""
        coded, saved_state = {}, {}
        for key, state in state_dict["state"].items():
            coded[key] = {name: state[name] for name in ("exp_avg_4bit", "exp_avg_sq_4bit") if name in state}
            saved_state[key] = {name: value for name, value in state.items() if name not in coded[key]}
        super().load_state_dict({**state_dict, "state": saved_state})
        saved_ids = [key for group in state_dict["param_groups"] for key in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for key, p in zip(saved_ids, params):  # torch's own pairing of saved states and parameters
            for name, q in coded.get(key, {}).items():
                self.state[p][name] = {part: tensor.to(p.device) for part, tensor in q.items()}

    def state_bytes(self) -> int:
        return sum(tensor_bytes(s) for s in self.state.values())

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
                step_size, bias_correction2 = group["lr"] / (1 - beta1 ** t), math.sqrt(1 - beta2 ** t)
                pieces = self._pieces(p)
                # (reshape: a gradient need not be contiguous; flattened once, not once a piece)
                grads = p.grad if pieces == [None] else p.grad.reshape(-1)
                for piece in pieces:
                    param, grad = piece_of(p, piece), (grads if piece is None else grads[piece]).float()
                    m, v = self._moment(state, "exp_avg", piece, param.shape), \
                        self._moment(state, "exp_avg_sq", piece, param.shape)
                    m.lerp_(grad, 1 - beta1)
                    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    denominator = (v.sqrt() / bias_correction2).add_(group["eps"])
                    param.mul_(1 - group["lr"] * group["weight_decay"])
                    param.addcdiv_(m.to(p.dtype), denominator.to(p.dtype), value=-step_size)
                    self._keep(state, "exp_avg", piece, m)
                    self._keep(state, "exp_avg_sq", piece, v)
        return loss

    def _moment(self, state, name: str, piece: slice | None, shape) -> torch.Tensor:
        """A piece of a moment in float32: decoded from its 4-bit codes, or a view of its float32 tensor."""
        if f"{name}_4bit" not in state:
            return piece_of(state[name], piece)
        coded = self._coded(state[f"{name}_4bit"], piece)
        return self._decode_m(coded, shape) if name == "exp_avg" else self._decode_v(coded, shape)

    def _keep(self, state, name: str, piece: slice | None, value: torch.Tensor):
        """A piece of a moment, updated: encoded into its 4-bit codes (a float32 one was updated in place)."""
        if f"{name}_4bit" in state:
            encoded = self._encode_m(value) if name == "exp_avg" else self._encode_v(value)
            for part, view in self._coded(state[f"{name}_4bit"], piece).items():
                view.copy_(encoded[part])

    def _coded(self, q: dict, piece: slice | None) -> dict:
        """The codes and scales of a piece of a moment (views: _keep writes into them)."""
        if piece is None:  # the whole tensor
            return q
        size = self.format.block_size
        return {"codes": q["codes"][piece.start // 2:(piece.stop + 1) // 2],
                "block": q["block"][piece.start // size:-(-piece.stop // size)]}


def piece_of(t: torch.Tensor, piece: slice | None) -> torch.Tensor:
    """A piece of a contiguous tensor, flattened (a view: updates write into it); None: all of it, as it is."""
    return t if piece is None else t.view(-1)[piece]


def convert_adamw_state(optimizer_state: dict, shapes: dict, to_4bit: bool):
    """Convert a saved optimizer state (keyed by parameter name), in place, to the format of the
    optimizer about to load it: torch AdamW's float32 moments <-> AdamW4bit's codes, so that a resumed run may switch
    use_4bit_optimizer. Checkpoints of earlier versions stored bitsandbytes nf4 codes of m and of
    v^(1/4) in blocks of 32: they are decoded, and re-encoded when the run stays 4-bit."""
    optimizer = AdamW4bit([torch.nn.Parameter(torch.zeros(1))])  # for its encoders
    for name, state in optimizer_state["state"].items():
        shape = shapes[name]
        if "exp_avg_sq_root4_4bit" in state:  # earlier versions
            from lowbit import dequantize
            state["exp_avg"] = dequantize(state.pop("exp_avg_4bit")).view(shape)
            state["exp_avg_sq"] = dequantize(state.pop("exp_avg_sq_root4_4bit")).view(shape).pow(4)
        if to_4bit and "exp_avg" in state and state["exp_avg"].numel() >= MIN_QUANTIZED_NUMEL:
            state["exp_avg_4bit"] = optimizer._encode_m(state.pop("exp_avg").float())
            state["exp_avg_sq_4bit"] = optimizer._encode_v(state.pop("exp_avg_sq").float())
        elif not to_4bit and "exp_avg_4bit" in state:
            state["exp_avg"] = optimizer._decode_m(state.pop("exp_avg_4bit"), shape)
            state["exp_avg_sq"] = optimizer._decode_v(state.pop("exp_avg_sq_4bit"), shape)


def adamw_state_bytes(params) -> int:
    """What torch.optim.AdamW keeps: two float32 moments per parameter (and a step count)."""
    return sum(2 * 4 * p.numel() + 4 for p in params)


def make_optimizer(model, cfg, device) -> torch.optim.Optimizer:
    """The optimizer of a BDH model for train.py and bench.py: AdamW, or AdamW4bit with
    low_precision.use_4bit_optimizer. Weight decay on every weight but the embedding table (the four
    matmul weights, and any the model gains). (bench_precision.py swaps torchao's AdamW4bit in for
    AdamW4bit to compare the two.)"""
    training, low_precision = cfg.training, cfg.low_precision
    decay = [p for name, p in model.named_parameters() if name != "embed.weight"]
    groups = [{"params": decay, "weight_decay": training.weight_decay},
              {"params": [model.embed.weight], "weight_decay": 0.0}]
    if low_precision.use_4bit_optimizer:
        return AdamW4bit(groups, lr=training.learning_rate, betas=(0.9, 0.95))
    # fused: one kernel for all of the weights (CUDA, and CPU since PyTorch 2.4: tiny.yaml's step 0.3 ms, not 1.4)
    return torch.optim.AdamW(groups, lr=training.learning_rate, betas=(0.9, 0.95),
                             fused=device.type in ("cuda", "cpu"))
