"""adamw4bit.py: the 4-bit moment format, the optimizer's update, resume and conversions."""
import copy
import math
import re

import pytest
import torch

import adamw4bit
import train
from adamw4bit import (MIN_QUANTIZED_NUMEL, AdamW4bit, MomentFormat, adamw_state_bytes, blocks, code_book,
                       convert_adamw_state, decode, encode, make_optimizer, nearest_level)
from checkpoint import load_checkpoint
from config import Config
from conftest import NEEDS_CUDA, write_config
from lowbit import dequantize, quantize
from model import BDH, BDHConfig
from runtime import tensor_bytes


@pytest.mark.parametrize("name", ["linear", "log", "dynamic", "nf4", "fp4"])
def test_code_books_have_16_ascending_levels_within_one(name):
    levels = code_book(name)
    assert levels.shape == (16,) and (levels.diff() >= 0).all()
    assert levels.abs().max() == 1.0
    assert (levels > 0).all() == (name in ("linear", "log"))  # the zero-free ones: v never decodes to 0


def test_dynamic_code_book_is_the_one_of_torchao_adamw4bit():
    from torchao.optim.quant_utils import create_dynamic_map
    torch.testing.assert_close(code_book("dynamic"), torch.tensor(create_dynamic_map(True, 3, 4)))


@pytest.mark.parametrize("name,rank1", [("dynamic", False), ("nf4", False), ("linear", False), ("linear", True)])
def test_encode_decode_is_nearest_level_times_scale(name, rank1):
    torch.manual_seed(0)
    x = torch.randn(96, 80)
    if name == "linear":
        x = x.abs()
    levels = code_book(name)
    q = encode(x, levels, 128, rank1)
    assert q["codes"].dtype == torch.uint8 and q["codes"].numel() == x.numel() // 2
    y = decode(q, levels, x.shape, 128)
    if rank1:
        scale = torch.minimum(x.amax(1, keepdim=True), x.amax(0, keepdim=True))
        assert set(q) == {"codes", "row", "column"}
    else:
        scale = x.flatten().view(-1, 128).abs().amax(1, keepdim=True).expand(-1, 128).reshape(x.shape)
    exact = levels[((x / scale)[..., None] - levels).abs().argmin(-1)] * scale  # nearest level, brute force
    torch.testing.assert_close(y, exact)


@pytest.mark.parametrize("name", ["linear", "log", "dynamic", "nf4", "fp4"])
def test_nearest_level_is_bucketize_on_the_midpoints_ties_included(name):
    """nearest_level counts midpoints (CPU) or computes the index in closed form (linear): the
    codes of torch.bucketize on the midpoints, the search it replaces, on random values, on the
    levels themselves and exactly on the midpoints (a tie goes to the lower level)."""
    torch.manual_seed(0)
    levels = code_book(name)
    midpoints = (levels[1:] + levels[:-1]) / 2
    lowest = 0.0 if name in ("linear", "log") else -1.0
    x = torch.cat([torch.rand(10_000) * (1 - lowest) + lowest, levels, midpoints,
                   torch.nextafter(midpoints, torch.tensor(2.0)), torch.tensor([lowest, 1.0])])
    expected = torch.bucketize(x, midpoints)
    assert torch.equal(nearest_level(x, levels), expected.to(torch.uint8))
    assert torch.equal(nearest_level(midpoints, levels), torch.arange(15, dtype=torch.uint8))


@pytest.mark.parametrize("numel,block_size", [(9, 3), (1, 32), (31, 64), (4097, 128)])
def test_encode_decode_at_any_length_and_block_size(numel, block_size):
    torch.manual_seed(0)
    x, levels = torch.randn(numel), code_book("dynamic")
    y = decode(encode(x, levels, block_size), levels, x.shape, block_size)
    scale = blocks(x, block_size).abs().amax(1, keepdim=True).expand(-1, block_size).flatten()[:numel]
    torch.testing.assert_close(y, levels[((x / scale)[:, None] - levels).abs().argmin(-1)] * scale)


def test_optimizer_state_is_at_most_a_sixth_of_adamw():
    model = BDH(BDHConfig(n_layer=3, n_embd=128, n_head=4, mlp_internal_dim_multiplier=16))
    optimizer = AdamW4bit(model.parameters())
    assert optimizer.state_bytes() <= adamw_state_bytes(model.parameters()) / 6
    assert "exp_avg_4bit" in optimizer.state[model.encoder] and "exp_avg_sq_4bit" in optimizer.state[model.decoder]


@pytest.mark.parametrize("moment_format", [MomentFormat(), MomentFormat(floor=True), MomentFormat(rank1=True),
                                           MomentFormat(block_size=33)])
def test_a_large_tensor_is_updated_a_piece_at_a_time_as_it_would_be_whole(moment_format, monkeypatch):
    """The float32 temporaries of a step (decoded moments, the update, the encoding) are those of
    adamw4bit.PIECE_NUMEL elements, not of the whole tensor, whose codes are the same (pieces of whole
    blocks and bytes). rank1's scales are the whole matrix's: it takes the tensor at once."""
    def run(chunk):
        monkeypatch.setattr(adamw4bit, "PIECE_NUMEL", chunk)
        decoded = []
        monkeypatch.setattr(adamw4bit, "decode", lambda q, levels, shape, *rest: decoded.append(
            math.prod(shape)) or real_decode(q, levels, shape, *rest))
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape)) for shape in ((3, 1000, 7), (4097,), (64, 129))]
        optimizer = AdamW4bit([{"params": params, "weight_decay": 0.1}], lr=1e-2, moment_format=moment_format)
        for step in range(3):
            for p in params:
                p.grad = torch.randn_like(p) * (step + 1)
            optimizer.step()
        return params, optimizer.state_dict()["state"], max(decoded)
    real_decode = adamw4bit.decode
    whole, whole_state, most_whole = run(1 << 20)
    pieces, pieces_state, most = run(1300)  # 10 blocks of 128; 39 of 33 would be an odd 1287, so 38
    expected = 21000 if moment_format.rank1 else 1254 if moment_format.block_size == 33 else 1280  # (even, 33 x 38)
    assert most_whole == 21000 and most == expected
    assert all(torch.equal(a, b) for a, b in zip(whole, pieces))
    for a, b in zip(whole_state.values(), pieces_state.values()):
        assert all(torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else
                   all(torch.equal(a[key][part], b[key][part]) for part in a[key]) for key in a)


def test_a_parameter_that_is_not_contiguous_is_updated_as_it_is(monkeypatch):
    monkeypatch.setattr(adamw4bit, "PIECE_NUMEL", 1280)  # (pieces would need a flat view)
    torch.manual_seed(0)
    weights, grad = torch.randn(100, 70), torch.randn(70, 100)
    contiguous, transposed = torch.nn.Parameter(weights.t().contiguous()), torch.nn.Parameter(weights.clone().t())
    optimizers = [AdamW4bit([p], lr=1e-2) for p in (contiguous, transposed)]
    for p, optimizer in zip((contiguous, transposed), optimizers):
        for _ in range(2):
            p.grad = grad.clone()
            optimizer.step()
    assert not transposed.is_contiguous() and torch.equal(contiguous, transposed)
    a, b = torch.nn.Parameter(weights.clone()), torch.nn.Parameter(weights.clone())  # a gradient that is not
    optimizers = [AdamW4bit([p], lr=1e-2) for p in (a, b)]
    a.grad, b.grad = grad.t(), grad.t().contiguous()  # (a transposed view, as some backward functions give)
    for optimizer in optimizers:
        optimizer.step()
    assert torch.equal(a, b)


def test_a_step_decodes_at_most_a_piece_of_a_large_weight(monkeypatch):
    """A step's float32 temporaries are a piece's (about a million elements), not the whole weight's:
    what keeps AdamW4bit's peak memory below AdamW's."""
    sizes, real_decode = [], adamw4bit.decode
    monkeypatch.setattr(adamw4bit, "decode", lambda q, levels, shape, *rest: sizes.append(
        shape.numel()) or real_decode(q, levels, shape, *rest))
    p = torch.nn.Parameter(torch.zeros(3 << 20))
    p.grad = torch.ones_like(p)
    AdamW4bit([p]).step()
    assert len(sizes) >= 6 and max(sizes) <= 1 << 20


def test_small_tensors_keep_float32_state_and_match_torch_adamw():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(MIN_QUANTIZED_NUMEL - 1))
    b = torch.nn.Parameter(a.detach().clone())
    ours = AdamW4bit([a], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    theirs = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    assert "exp_avg" in ours.state[a] and "exp_avg_4bit" not in ours.state[a]
    for _ in range(5):
        g = torch.randn_like(a)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    p = torch.nn.Parameter(torch.zeros(MIN_QUANTIZED_NUMEL))  # from the threshold on: 4 bits, converted alike
    assert "exp_avg_4bit" in AdamW4bit([p]).state[p] and "exp_avg" not in AdamW4bit([p]).state[p]
    saved = {"state": {"w": {"step": torch.tensor(1.0), "exp_avg": torch.ones(MIN_QUANTIZED_NUMEL),
                             "exp_avg_sq": torch.ones(MIN_QUANTIZED_NUMEL)}}, "param_groups": []}
    convert_adamw_state(saved, {"w": p.shape}, to_4bit=True)
    assert "exp_avg_4bit" in saved["state"]["w"] and "exp_avg" not in saved["state"]["w"]


def test_without_hyperparameters_it_steps_as_torch_adamw_without_weight_decay():
    """lr, betas and eps are torch's defaults: tiny gradients, where eps decides the step, included."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(100))
    b = torch.nn.Parameter(a.detach().clone())
    ours, theirs = AdamW4bit([a]), torch.optim.AdamW([b], weight_decay=0.0)
    for scale in (1.0, 1e-7, 1e-8, 1.0, 1e-9):
        g = torch.randn_like(a) * scale
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("numel", [100, MIN_QUANTIZED_NUMEL])
def test_a_zero_gradient_leaves_the_weights_as_they_are(numel):
    """m = v = 0: the step is 0 / (0 + eps) = 0, not 0 / 0 (NaN), float32 moments or 4-bit ones."""
    p = torch.nn.Parameter(torch.ones(numel))
    optimizer = AdamW4bit([p], lr=1e-2)
    for _ in range(2):
        p.grad = torch.zeros_like(p)
        optimizer.step()
    assert torch.equal(p.detach(), torch.ones(numel))


def test_a_step_skips_parameters_without_a_gradient_and_runs_a_closure_with_gradients():
    """torch's contract: a parameter no loss reached (grad None) is left alone, its step count too;
    step(closure) may call backward in the closure, and returns its loss."""
    used, unused = torch.nn.Parameter(torch.ones(10)), torch.nn.Parameter(torch.ones(MIN_QUANTIZED_NUMEL))
    optimizer = AdamW4bit([used, unused], lr=1e-2)

    def closure():
        optimizer.zero_grad()
        loss = (used ** 2).sum()
        loss.backward()
        return loss
    assert optimizer.step(closure).item() == 10.0
    assert (used < 1).all() and torch.equal(unused.detach(), torch.ones(MIN_QUANTIZED_NUMEL))
    assert optimizer.state[unused]["step"] == 0


def test_quantized_updates_follow_adamw_closely():
    """Same gradients into AdamW and AdamW4bit for 50 steps: each step of the 4-bit one points
    the way AdamW's does (the moments' rounding changes its size element by element)."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64, 128))
    b = torch.nn.Parameter(a.detach().clone())
    ours = AdamW4bit([a], lr=1e-3, betas=(0.9, 0.95))
    theirs = torch.optim.AdamW([b], lr=1e-3, betas=(0.9, 0.95))
    for _ in range(50):
        g = torch.randn_like(a) * 0.1 + 0.05 * a.detach()
        before_a, before_b = a.detach().clone(), b.detach().clone()
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
        cosine = torch.nn.functional.cosine_similarity((a - before_a).flatten(), (b - before_b).flatten(), dim=0)
        assert cosine > 0.9
    assert (a - b).norm() < 0.1 * b.detach().norm()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_steady_gradient_moves_a_block_s_largest_value_as_adamw_does_whatever_its_sign(sign):
    """The dynamic code book ends at -0.8875 and +1: scaled by its absolute maximum, a block's largest
    negative m would be decoded 11% smaller at every step (here: half as large a step)."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.zeros(32, 128))
    b = torch.nn.Parameter(torch.zeros(32, 128))
    ours = AdamW4bit([a], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    theirs = torch.optim.AdamW([b], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.randn(32, 128) * 1e-3
    g[:, 0] = sign  # the largest of each block of 128
    for _ in range(100):
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(a[:, 0], b[:, 0], rtol=0.01, atol=0)


def test_loading_a_state_leaves_its_4bit_codes_as_they_are():
    """torch's load_state_dict would turn the uint8 codes into float32 (4 times their bytes) on the way."""
    p = torch.nn.Parameter(torch.randn(32, 128))
    optimizer = AdamW4bit([p])
    p.grad = torch.randn_like(p)
    optimizer.step()
    saved = optimizer.state_dict()
    loaded = AdamW4bit([p])
    loaded.load_state_dict(saved)
    for name in ("exp_avg_4bit", "exp_avg_sq_4bit"):
        assert loaded.state[p][name]["codes"] is saved["state"][0][name]["codes"]
    assert loaded.state[p]["step"] == 1 and loaded.state_bytes() == optimizer.state_bytes()


def test_a_loaded_state_carries_on_each_parameter_s_steps_and_a_parameter_without_one_starts_afresh():
    """Two 4-bit weights of different sizes carry on exactly as the saved optimizer would; a weight
    the saved state lacks (the model gained it since) starts its moments from zero, as a new optimizer's."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in ((64, 128), (32, 384), (10,))]
    optimizer = AdamW4bit(params, lr=1e-2)
    for p in params[:2]:
        p.grad = torch.randn_like(p)
    optimizer.step()
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    saved = copy.deepcopy(optimizer.state_dict())  # (as from a file: tensors of its own)
    del saved["state"][2]
    new = torch.nn.Parameter(params[2].detach().clone())
    loaded, fresh = AdamW4bit(copies, lr=1e-2), AdamW4bit([new], lr=1e-2)
    loaded.load_state_dict(saved)
    for p, q in zip(params, copies):
        p.grad = q.grad = torch.randn_like(p)
    new.grad = copies[2].grad.clone()
    for each in (optimizer, loaded, fresh):
        each.step()
    assert torch.equal(params[0], copies[0]) and torch.equal(params[1], copies[1]) and torch.equal(copies[2], new)


@NEEDS_CUDA
def test_a_state_saved_on_the_cpu_loads_onto_the_parameter_s_device():
    """A checkpoint loaded with map_location cpu, resumed on the GPU: the 4-bit codes and scales go where
    the parameter is."""
    p = torch.nn.Parameter(torch.randn(64, 128))
    optimizer = AdamW4bit([p])
    p.grad = torch.randn_like(p)
    optimizer.step()
    q = torch.nn.Parameter(p.detach().cuda())
    loaded = AdamW4bit([q])
    loaded.load_state_dict(optimizer.state_dict())
    assert all(t.device == q.device for name in ("exp_avg_4bit", "exp_avg_sq_4bit")
               for t in loaded.state[q][name].values())
    q.grad = torch.randn_like(q)
    loaded.step()


def test_the_floor_keeps_v_at_the_smallest_positive_level_of_its_block():
    """MomentFormat(floor=True) with a code book that has a 0 (nf4): a second moment far below its
    block's maximum decodes to the smallest positive level x the block's scale, not to 0."""
    optimizer = AdamW4bit([torch.nn.Parameter(torch.zeros(1))],
                          moment_format=MomentFormat(v_code="nf4", v_form="v", floor=True))
    v = torch.full((256,), 1e-12)
    v[::128] = 2.0
    decoded = optimizer._decode_v(optimizer._encode_v(v), v.shape)
    smallest = code_book("nf4")[code_book("nf4") > 0].min()
    torch.testing.assert_close(decoded[1:128], torch.full((127,), 2.0 * smallest.item()))


def test_rank1_keeps_block_scales_for_a_one_dimensional_weight():
    """rank1 scales a matrix by its rows and columns; a vector keeps per-block scales, not one scale
    per element (a float32 per value: no saving)."""
    p = torch.nn.Parameter(torch.zeros(MIN_QUANTIZED_NUMEL))
    state = AdamW4bit([p], moment_format=MomentFormat(rank1=True)).state[p]["exp_avg_sq_4bit"]
    assert set(state) == {"codes", "block"} and state["block"].numel() == MIN_QUANTIZED_NUMEL // 128


def test_adamw_state_bytes_is_what_torch_adamw_keeps():
    """The "x AdamW's" ratio a run prints divides by the bytes of torch AdamW's own state."""
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in ((3, 5), (7,), (4, 4, 2))]
    optimizer = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    assert adamw_state_bytes(params) == tensor_bytes(optimizer.state_dict()["state"])


def test_a_second_moment_far_below_its_block_maximum_cannot_blow_up_the_step():
    """A block whose second moment holds one large value and tiny ones. A code book with a 0 would
    round the tiny ones to 0, and m / (0 + eps) would be a step of millions; the zero-free linear
    code book decodes v^(1/4) as at least 1/16 of the block's maximum, so sqrt(v) >= 1/256 of it."""
    p = torch.nn.Parameter(torch.zeros(MIN_QUANTIZED_NUMEL))
    m, v = torch.full_like(p, 0.5), torch.full_like(p, 1e-12)
    m[::128], v[::128] = 1.0, 1.0  # one large second moment per block of 128
    steps = {}
    for name, moment_format in (("default", MomentFormat()), ("nf4 v", MomentFormat(v_code="nf4"))):
        q = p.detach().clone().requires_grad_()
        optimizer = AdamW4bit([q], lr=1.0, betas=(0.9, 0.999), weight_decay=0.0, moment_format=moment_format)
        state = optimizer.state[q]
        state["step"].fill_(1000)  # bias corrections ~1: the step is m / sqrt(v)
        state["exp_avg_4bit"], state["exp_avg_sq_4bit"] = optimizer._encode_m(m), optimizer._encode_v(v)
        q.grad = torch.zeros_like(q)
        optimizer.step()
        steps[name] = q.detach().abs().max()
    assert steps["nf4 v"] > 1e4  # what a code book with a 0 does
    assert steps["default"] <= 0.5 * 256 * 1.01


def test_4bit_optimizer_trains_and_resumes_exactly(tmp_path, corpus, capsys):
    path = write_config(tmp_path, corpus, max_iters=4, checkpoint_freq=2, test_freq=100, keep_last_n=0)
    flags = ["low_precision.use_4bit_optimizer=true"]
    assert train.main(["--config", str(path), *flags]) == 0
    out = capsys.readouterr().out
    assert "optimizer AdamW4bit (m: dynamic, v^(1/4): linear, blocks of 128), state" in out and "x AdamW's" in out
    state, ratio, full = map(float, re.search(r"state ([\d.]+) MiB = ([\d.]+) x AdamW's ([\d.]+) MiB", out).groups())
    assert 0 < ratio < 1 and ratio == pytest.approx(state / full, abs=0.01)
    [run] = (tmp_path / "ck").iterdir()
    straight = load_checkpoint(run / "checkpoint_4.pt")
    assert straight.optimizer["state"]["encoder"]["exp_avg_sq_4bit"]["codes"].dtype == torch.uint8
    assert train.main(["--config", str(path), *flags,
                       f"training.resume_from_checkpoint={run / 'checkpoint_2.pt'}"]) == 0
    resumed = load_checkpoint(run / "checkpoint_4.pt")
    for name, tensor in straight.model.items():
        assert torch.equal(resumed.model[name], tensor), name


def test_resume_may_switch_between_adamw_and_the_4bit_optimizer(tmp_path, corpus, capsys):
    path = write_config(tmp_path, corpus, max_iters=2, checkpoint_freq=2, test_freq=100)
    assert train.main(["--config", str(path)]) == 0
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest", "training.max_iters=3",
                       "low_precision.use_4bit_optimizer=true"]) == 0
    assert train.main(["--config", str(path), "training.resume_from_checkpoint=latest", "training.max_iters=4",
                       "low_precision.use_4bit_optimizer=false"]) == 0
    out = capsys.readouterr().out
    assert "converting the checkpoint's optimizer state to 4-bit moments" in out
    assert "converting the checkpoint's optimizer state to float32 moments" in out
    [run] = (tmp_path / "ck").iterdir()
    assert "exp_avg_4bit" in load_checkpoint(run / "checkpoint_3.pt").optimizer["state"]["encoder"]
    assert "exp_avg" in load_checkpoint(run / "checkpoint_4.pt").optimizer["state"]["encoder"]


def test_switching_optimizers_converts_the_moments_to_what_they_were():
    """AdamW's float32 moments -> 4-bit codes -> float32: within 4-bit rounding of themselves (the
    switch above goes both ways on resume; a wrong code book or v's form would change them wholesale)."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 128))
    assert weight.numel() >= MIN_QUANTIZED_NUMEL
    adamw = torch.optim.AdamW([weight], lr=1e-3, betas=(0.9, 0.95))
    for _ in range(3):
        weight.grad = torch.randn_like(weight) * torch.rand(64, 1) * 1e-2  # rows of different scales
        adamw.step()
    saved = adamw.state_dict()
    saved = {"state": {"w": saved["state"][0]}, "param_groups": saved["param_groups"]}
    moments = {k: saved["state"]["w"][k].clone() for k in ("exp_avg", "exp_avg_sq")}
    convert_adamw_state(saved, {"w": weight.shape}, to_4bit=True)
    assert {"exp_avg_4bit", "exp_avg_sq_4bit"} <= set(saved["state"]["w"]) and "exp_avg" not in saved["state"]["w"]
    convert_adamw_state(saved, {"w": weight.shape}, to_4bit=False)
    for name, before in moments.items():
        after = saved["state"]["w"][name]
        assert after.shape == before.shape and (after - before).norm() < 0.25 * before.norm(), name


def test_a_checkpoint_of_the_earlier_bitsandbytes_format_resumes(tmp_path, corpus):
    """Earlier versions stored nf4 codes of m and v^(1/4) in blocks of 32 (bitsandbytes dicts)."""
    path = write_config(tmp_path, corpus, max_iters=2, checkpoint_freq=2, test_freq=100)
    assert train.main(["--config", str(path), "low_precision.use_4bit_optimizer=true"]) == 0
    [run] = (tmp_path / "ck").iterdir()
    old = torch.load(run / "checkpoint_2.pt", weights_only=True)
    moments = {}
    for name, state in old["optimizer"]["state"].items():
        if "exp_avg_4bit" in state:
            shape = old["model"][name].shape
            m = decode(state.pop("exp_avg_4bit"), code_book("dynamic"), shape, 128)
            v = decode(state.pop("exp_avg_sq_4bit"), code_book("linear"), shape, 128)
            moments[name] = m, v
            state["exp_avg_4bit"] = quantize(m, "nf4", True, 32)
            state["exp_avg_sq_root4_4bit"] = quantize(v.pow(0.25), "nf4", True, 32)
    torch.save(old, run / "checkpoint_2.pt")
    import copy
    converted = copy.deepcopy(old["optimizer"])  # the old codes decode to the moments they were made from
    convert_adamw_state(converted, {name: old["model"][name].shape for name in moments}, to_4bit=False)
    for name, (m, v) in moments.items():
        state, round_trip = converted["state"][name], lambda x: dequantize(quantize(x, "nf4", True, 32)).view(x.shape)
        torch.testing.assert_close(state["exp_avg"], round_trip(m))
        torch.testing.assert_close(state["exp_avg_sq"], round_trip(v.pow(0.25)).pow(4))
    for use_4bit in ("true", "false"):  # stays 4-bit in the new format, or turns float32
        assert train.main(["--config", str(path), f"training.resume_from_checkpoint={run / 'checkpoint_2.pt'}",
                           "training.max_iters=3", f"low_precision.use_4bit_optimizer={use_4bit}"]) == 0
        state = load_checkpoint(run / "checkpoint_3.pt").optimizer["state"]["encoder"]
        assert ("exp_avg_sq_4bit" in state) == (use_4bit == "true") and "exp_avg_sq_root4_4bit" not in state


@pytest.mark.parametrize("use_4bit_optimizer", [False, True])
def test_weight_decay_applies_to_the_matmul_weights_and_not_to_the_embedding(use_4bit_optimizer):
    """Either optimizer: the same training.learning_rate and betas (0.9, 0.95); only the moments' storage differs."""
    cfg = Config.from_dict({"model": {"n_layer": 1, "n_embd": 32, "n_head": 2},
                            "training": {"weight_decay": 0.3, "learning_rate": 0.0123},
                            "low_precision": {"use_4bit_optimizer": use_4bit_optimizer}})
    model = BDH(cfg.model)
    model.gate = torch.nn.Parameter(torch.ones(4))  # a weight the model gains is trained too
    groups = make_optimizer(model, cfg, torch.device("cpu")).param_groups
    assert {(group["lr"], tuple(group["betas"])) for group in groups} == {(0.0123, (0.9, 0.95))}
    decay = {id(p): group["weight_decay"] for group in groups for p in group["params"]}
    names = {id(p): name for name, p in model.named_parameters()}
    assert sorted(decay) == sorted(names)  # each parameter in one group
    assert {names[i]: d for i, d in decay.items()} == {
        "embed.weight": 0.0, "encoder": 0.3, "encoder_v": 0.3, "decoder": 0.3, "lm_head": 0.3, "gate": 0.3}
