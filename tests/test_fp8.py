"""FP8 GEMMs through torchao. torch._scaled_mm runs on CPU with the pinned torch, so the FP8 path
itself is tested here; training refuses devices without FP8 tensor cores, and the CUDA tests run
only where there is one."""
import pytest
import torch

import fp8
import sample
import train
from checkpoint import load_checkpoint
from config import Config
from conftest import run_dirs, write_config
from model import PLAIN, BDH, BDHConfig
from reference import reference_forward

SMALL = BDHConfig(n_layer=2, n_embd=64, n_head=2, mlp_internal_dim_multiplier=8, dropout=0.0)
FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= fp8.MIN_CAPABILITY


def relative(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def forward_backward(forward, model, idx, dtype):
    model.zero_grad()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        logits, loss = forward(idx, torch.roll(idx, -1, 1))
    loss.backward()
    return logits, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("recipe,fmt", [("tensorwise", "hybrid"), ("tensorwise", "e4m3"),
                                        ("rowwise", "e4m3"), ("rowwise_with_gw_hp", "e4m3")])
def test_fp8_forward_and_backward_against_bf16(monkeypatch, recipe, fmt):
    """Every weight product of a training step is an FP8 GEMM (but the weight gradients of
    rowwise_with_gw_hp). Tolerance: FP8 (3 mantissa bits) against float32 within 10% on the logits
    and 35% on the weight gradients of this untrained 2-layer model; bf16 is ~10x closer, so the
    FP8 error must also be at least 3x bf16's: a path that silently ran in bf16 fails."""
    cfg = Config().fp8
    cfg.torchao_recipe, cfg.format = recipe, fmt
    matmuls, description = fp8.torchao_matmuls(cfg)
    assert description.startswith(f"torchao {recipe}")
    assert description.endswith(", weight gradients in high precision") == (recipe == "rowwise_with_gw_hp")
    gemms = []
    real_scaled_mm = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda a, b, *args, **kw: gemms.append(
        (a.dtype, b.dtype)) or real_scaled_mm(a, b, *args, **kw))
    torch.manual_seed(0)
    model = BDH(SMALL)
    idx = torch.randint(0, 256, (2, 32))
    model.matmuls = matmuls
    logits8, grads8 = forward_backward(model, model, idx, torch.bfloat16)
    gemms_per_step = len(gemms)
    model.matmuls = PLAIN
    logits16, grads16 = forward_backward(lambda *a: reference_forward(model, *a), model, idx, torch.bfloat16)
    logits32, grads32 = forward_backward(lambda *a: reference_forward(model, *a), model, idx, torch.float32)
    # per layer and head: forward 3 and the recomputed b; backward 3 grad_input, 3 grad_weight
    per_layer_and_head = 7 if recipe == "rowwise_with_gw_hp" else 10
    assert gemms_per_step == SMALL.n_layer * SMALL.n_head * per_layer_and_head
    grad_dtype = torch.float8_e5m2 if fmt == "hybrid" else torch.float8_e4m3fn
    assert {a for a, _ in gemms} | {b for _, b in gemms} == {torch.float8_e4m3fn, grad_dtype}
    assert relative(logits8, logits32) < 0.10
    assert relative(logits8, logits32) > 3 * relative(logits16, logits32)
    for name in ("encoder", "encoder_v", "decoder"):
        assert relative(grads8[name], grads32[name]) < 0.35, name
    gemms.clear()
    model.matmuls = matmuls
    with torch.no_grad():
        model.eval()(idx)
    assert gemms == []  # evaluation runs in the compute dtype


@pytest.mark.parametrize("capability,accepted", [((8, 9), True), ((9, 0), True), ((10, 0), True),
                                                 ((8, 6), False), ((8, 0), False)])
def test_fp8_is_accepted_from_compute_capability_8_9(monkeypatch, capability, accepted):
    """Ada (8.9), Hopper (9.0) and Blackwell run FP8 GEMMs; an Ampere GPU (8.0, 8.6) is refused in one
    line naming the GPU and its capability."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    if accepted:
        fp8.check_device(torch.device("cuda"))
    else:
        with pytest.raises(fp8.FP8Error, match=f"Some GPU has {capability[0]}.{capability[1]}. Set "
                                               "low_precision.use_fp8=false"):
            fp8.check_device(torch.device("cuda"))


def test_each_gemm_casts_its_gradient_operand_to_e5m2_in_hybrid(monkeypatch):
    """hybrid: activations and weights in E4M3, gradients in E5M2 (its wider range), whichever operand
    of the GEMM the gradient is: the first of grad_input (grad x weight), the second of grad_weight."""
    gemms, real_scaled_mm = [], torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda a, b, *args, **kw: gemms.append(
        (a.dtype, b.dtype)) or real_scaled_mm(a, b, *args, **kw))
    cfg = Config().fp8
    cfg.torchao_recipe, cfg.format = "tensorwise", "hybrid"
    matmuls = fp8.torchao_matmuls(cfg)[0]
    a, b = torch.randn(2, 16, 32), torch.randn(2, 32, 16)
    e4m3, e5m2 = torch.float8_e4m3fn, torch.float8_e5m2
    for role, expected in (("output", (e4m3, e4m3)), ("grad_input", (e5m2, e4m3))):
        gemms.clear()
        matmuls.product(a, b, role)
        assert gemms == [expected, expected], role
    gemms.clear()
    total = torch.zeros(2, 16, 16)
    matmuls.accumulate(total, a, b)
    assert gemms == [(e4m3, e5m2)] * 2 and total.abs().sum() > 0


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "rowwise_with_gw_hp"])
def test_each_gemm_keeps_the_recipe_s_scale_rounding_and_accumulation(recipe):
    """What torchao's recipe sets for each GEMM: power-of-2 scales (rowwise), and fast accumulation for
    the forward GEMM only."""
    from torchao.float8 import Float8LinearConfig
    cfg = Config().fp8
    cfg.torchao_recipe, cfg.format = recipe, "hybrid" if recipe == "tensorwise" else "e4m3"
    matmuls = fp8.torchao_matmuls(cfg)[0]
    reference = Float8LinearConfig.from_recipe_name(recipe)
    gemms = {"output": reference.gemm_config_output, "grad_input": reference.gemm_config_grad_input,
             "grad_weight": reference.gemm_config_grad_weight}
    for role, (config, mm_config) in matmuls.roles.items():
        assert config.round_scales_to_power_of_2 == reference.round_scales_to_power_of_2, role
        assert mm_config.output.use_fast_accum == gemms[role].use_fast_accum, role
    assert matmuls.roles["output"][1].output.use_fast_accum != matmuls.roles["grad_input"][1].output.use_fast_accum


def test_fp8_training_is_refused_without_an_fp8_gpu(tmp_path, corpus, capsys, monkeypatch):
    if FP8_GPU:
        pytest.skip("this machine has an FP8 GPU")
    path = write_config(tmp_path, corpus, batch_size=4, block_size=16, max_iters=2, checkpoint_freq=2)
    assert train.main(["--config", str(path), "low_precision.use_fp8=true"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a CUDA GPU with compute capability >= 8.9" in err
    assert not (tmp_path / "ck").exists()
    # a resume that asks for it: refused before the data is read and the run's folder is touched
    assert train.main(["--config", str(path)]) == 0
    [run] = run_dirs(tmp_path)
    files = sorted(run.iterdir())
    monkeypatch.setattr(train, "prepare_data", lambda *a: pytest.fail("the data was read"))
    assert train.main(["--config", str(path), "low_precision.use_fp8=true", "training.max_iters=4",
                       f"training.resume_from_checkpoint={run}"]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err and sorted(run.iterdir()) == files


def test_transformer_engine_backend_is_refused_with_the_reason(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.setattr(fp8, "check_device", lambda device: None)
    path = write_config(tmp_path, corpus)
    assert train.main(["--config", str(path), "low_precision.use_fp8=true",
                       "fp8.backend=transformer_engine"]) == 1
    assert "fp8.backend transformer_engine: not implemented" in capsys.readouterr().err


def test_fp8_run_trains_and_its_checkpoint_loads_in_bf16_and_sample(tmp_path, corpus, capsys, monkeypatch):
    """The whole training loop on the FP8 path (the device check lifted: CPU runs the FP8 GEMMs
    too, only slowly), with activation checkpointing and the 4-bit optimizer."""
    monkeypatch.setattr(fp8, "check_device", lambda device: None)
    path = write_config(tmp_path, corpus, max_iters=6, checkpoint_freq=6, test_freq=6)
    flags = ["low_precision.use_fp8=true", "low_precision.compute_dtype=bfloat16",
             "training.activation_checkpointing=true", "low_precision.use_4bit_optimizer=true"]
    assert train.main(["--config", str(path), *flags]) == 0
    out = capsys.readouterr().out
    assert "FP8 GEMMs for encoder, encoder_v, decoder: torchao tensorwise" in out
    [ckpt] = (tmp_path / "ck").glob("run_*/checkpoint_6.pt")
    state = load_checkpoint(ckpt)
    assert set(state.model) == {"embed.weight", "encoder", "encoder_v", "decoder", "lm_head"}
    assert all(t.dtype == torch.float32 for t in state.model.values())
    assert train.main(["--config", str(path), "low_precision.compute_dtype=bfloat16", "low_precision.use_fp8=false",
                       "low_precision.use_4bit_optimizer=true", "training.max_iters=7",
                       f"training.resume_from_checkpoint={ckpt}"]) == 0  # (FP8 off: given, not left out)
    assert sample.main(["--checkpoint", str(ckpt), "--max-new-tokens", "5", "--device", "cpu"]) == 0


@pytest.mark.skipif(not FP8_GPU, reason="needs a CUDA GPU with compute capability >= 8.9")
def test_fp8_trains_on_the_gpu(tmp_path, corpus, capsys):
    path = write_config(tmp_path, corpus, device="cuda", batch_size=16, block_size=64, max_iters=20,
                        checkpoint_freq=20, test_freq=20, model={"n_embd": 64, "dropout": 0.0})
    assert train.main(["--config", str(path), "low_precision.use_fp8=true",
                       "low_precision.compute_dtype=bfloat16", "training.compile=true"]) == 0
    out = capsys.readouterr().out
    assert "FP8 GEMMs" in out
    losses = [float(line.split("loss ")[1].split()[0]) for line in out.splitlines() if line.startswith("step ")
              and "| loss" in line]
    assert losses[-1] < losses[0]
