import math

import pytest
import torch
import torch.nn.functional as F

import model as model_module
from model import (PLAIN, BDH, TILE, BDHConfig, LayerStack, empty_states, layer_forward, layer_norm, pack_bits,
                   recurrent_forward, rope_angles, rope_frequencies, rope_phases, unpack_bits)
from conftest import DEVICES, NEEDS_CUDA
from reference import reference_forward, reference_generate


def reference_logits(params, cfg: BDHConfig, idx):
    """MODEL.md written out directly: per head, explicit phases and pair rotation, float64."""
    H, N, L = cfg.n_head, cfg.n_latent, cfg.n_layer
    B, T = idx.shape
    p = {k: v.double() for k, v in params.items()}

    def ln(v):
        mu = v.mean(-1, keepdim=True)
        var = ((v - mu) ** 2).mean(-1, keepdim=True)
        return (v - mu) / torch.sqrt(var + 1e-5)

    j = torch.arange(N, dtype=torch.float32)
    q = 2 * torch.floor(j / 2)
    f = 1.0 / (2.0**16) ** (q / N) / (2 * math.pi)
    t = torch.arange(T, dtype=torch.float32)[:, None]
    phase = (2 * math.pi * torch.frac(t * f)).double()  # (T, N), float32 then promoted
    cos, sin = torch.cos(phase), torch.sin(phase)

    def rope(a):  # a: (T, N)
        out = torch.empty_like(a)
        out[:, 0::2] = a[:, 0::2] * cos[:, 0::2] - a[:, 1::2] * sin[:, 0::2]
        out[:, 1::2] = a[:, 1::2] * cos[:, 1::2] + a[:, 0::2] * sin[:, 1::2]
        return out

    mask = torch.tensor([[1.0 if s < tt else 0.0 for s in range(T)] for tt in range(T)], dtype=torch.float64)
    logits = []
    for b_ in range(B):
        x = ln(p["embed.weight"][idx[b_]])  # (T, D)
        for _ in range(L):
            zs = []
            for h in range(H):
                a = torch.relu(x @ p["encoder"][h])
                r = rope(a)
                A = (r @ r.T) * mask
                y = ln(A @ x)
                bb = torch.relu(y @ p["encoder_v"][h])
                zs.append(a * bb)
            z = torch.cat(zs, dim=-1)  # (T, H*N): head-major
            m = ln(z @ p["decoder"])
            x = ln(x + m)
        logits.append(x @ p["lm_head"])
    return torch.stack(logits)


def small_model(seed=0, std=0.3, device="cpu", **kw):
    torch.manual_seed(seed)
    cfg = BDHConfig(n_layer=3, n_embd=32, n_head=4, mlp_internal_dim_multiplier=8, dropout=0.0, **kw)
    model = BDH(cfg)
    with torch.no_grad():  # larger random weights than the init, so every term matters
        for prm in model.parameters():
            prm.normal_(0.0, std)
    return model.to(device).eval(), cfg


def test_parameter_names_and_shapes_are_the_checkpoint_format():
    cfg = BDHConfig()
    shapes = {k: tuple(v.shape) for k, v in BDH(cfg).state_dict().items()}
    assert shapes == {"embed.weight": (256, 256), "encoder": (4, 256, 8192), "encoder_v": (4, 256, 8192),
                      "decoder": (4 * 8192, 256), "lm_head": (256, 256)}
    assert abs(sum(math.prod(s) for s in shapes.values()) / 1e6 - 25.3) < 0.05
    for config in (cfg, BDHConfig(n_embd=48, n_head=3, mlp_internal_dim_multiplier=5, vocab_size=300)):
        assert config.n_params == sum(p.numel() for p in BDH(config).parameters())  # what the memory check counts


def test_matches_independent_implementation_of_the_spec():
    model, cfg = small_model()
    for T in (1, 7, 24):
        idx = torch.randint(0, 256, (2, T))
        logits, _ = model(idx)
        expected = reference_logits(model.state_dict(), cfg, idx)
        assert torch.allclose(logits.double(), expected, atol=1e-5, rtol=1e-5), \
            (logits.double() - expected).abs().max()


def test_original_state_dict_with_rope_buffer_loads_unchanged():
    model, _ = small_model()
    original = dict(model.state_dict())
    original["attn.freqs"] = torch.zeros(1, 1, 1, 64)
    fresh, _ = small_model(seed=1)
    fresh.load_state_dict(original)  # strict
    idx = torch.randint(0, 256, (1, 10))
    assert torch.equal(fresh(idx)[0], model(idx)[0])


def test_a_model_cast_to_another_dtype_keeps_float32_rope_phases():
    model, _ = small_model()
    for dtype in (torch.bfloat16, torch.float64):  # a buffer would be cast: bfloat16 phases are off by radians
        cast = model.to(dtype)
        assert cast.rope_freqs.dtype == torch.float32
        assert torch.equal(cast.rope_freqs, rope_frequencies(cast.config.n_latent))


def test_causal_future_tokens_do_not_change_the_past():
    model, _ = small_model()
    idx = torch.randint(0, 256, (1, 20))
    changed = idx.clone()
    changed[0, 12:] = torch.randint(0, 256, (8,))
    a, b = model(idx)[0], model(changed)[0]
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_attention_excludes_the_diagonal():
    # With a strict mask, position 0 attends to nothing, so its logits cannot depend on the
    # encoder weights; with the diagonal included they would.
    model, _ = small_model()
    idx = torch.randint(0, 256, (1, 6))
    before = model(idx)[0]
    with torch.no_grad():
        model.encoder.mul_(3.0)
    after = model(idx)[0]
    assert torch.equal(before[:, 0], after[:, 0])
    assert not torch.allclose(before[:, 1:], after[:, 1:])


def test_untrained_loss_is_close_to_uniform():
    torch.manual_seed(0)
    model = BDH(BDHConfig(n_layer=2, n_embd=64, mlp_internal_dim_multiplier=16)).eval()
    idx = torch.randint(0, 256, (4, 64))
    _, loss = model(idx, idx)
    assert abs(loss.item() - math.log(256)) < 0.05


def test_dropout_only_in_training_mode():
    torch.manual_seed(0)
    model = BDH(BDHConfig(n_layer=2, n_embd=32, mlp_internal_dim_multiplier=8, dropout=0.5))
    idx = torch.randint(0, 256, (1, 16))
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])


def test_dropout_drops_its_share_of_the_latents(monkeypatch):
    real, dropped = model_module.layer_forward, []

    def layer_forward(x, encoder, encoder_v, decoder, phases, drop=None, dropout=0.0, *args, **kwargs):
        dropped.append(drop.float().mean().item())
        return real(x, encoder, encoder_v, decoder, phases, drop, dropout, *args, **kwargs)
    monkeypatch.setattr(model_module, "layer_forward", layer_forward)
    torch.manual_seed(0)
    model = BDH(BDHConfig(n_layer=2, n_embd=32, mlp_internal_dim_multiplier=8, dropout=0.3)).train()
    model(torch.randint(0, 256, (2, 64)))
    assert dropped == pytest.approx([0.3, 0.3], abs=0.01)  # of 2 x 64 x 256 latents a layer


def test_sampling_draws_from_the_softmax_of_the_logits_over_the_temperature_within_top_k():
    logits = torch.log(torch.tensor([[1.0, 3.0, 0.5, 0.1]])).repeat(20000, 1)
    generator = torch.Generator().manual_seed(0)

    def shares(temperature, top_k=None):
        drawn = BDH.sample_next(logits, temperature, top_k, generator).flatten()
        return torch.bincount(drawn, minlength=4).float() / len(drawn)
    for temperature in (1.0, 2.0, 0.5):
        expected = F.softmax(logits[0] / temperature, dim=-1)
        assert torch.allclose(shares(temperature), expected, atol=0.015), temperature
    assert torch.allclose(shares(1.0, top_k=2), torch.tensor([0.25, 0.75, 0.0, 0.0]), atol=0.015)
    assert torch.allclose(shares(1.0, top_k=1000), F.softmax(logits[0], dim=-1), atol=0.015)  # above the vocabulary


def test_temperature_zero_is_greedy_between_near_ties_and_a_tiny_temperature_is_no_nan():
    generator = torch.Generator().manual_seed(0)
    drawn = BDH.sample_next(torch.tensor([[0.0, 1e-4, -1.0]]).repeat(2000, 1), 0, None, generator)
    assert drawn.shape == (2000, 1) and torch.all(drawn == 1)
    # the logits are shifted by their maximum before the division: no inf / inf = nan
    drawn = BDH.sample_next(torch.tensor([[1.0, 3.0, 2.0], [5.0, -5.0, 4.0]]), 1e-40, None, generator)
    assert drawn.flatten().tolist() == [1, 0]


def test_generation_runs_no_step_after_the_last_token(monkeypatch):
    """The prompt in chunks of prompt_chunk, then one step per new token but the last (nothing follows it)."""
    real, calls = model_module.recurrent_forward, []

    def recurrent_forward(model, tokens, *args, **kwargs):
        calls.append(tokens.size(1))
        return real(model, tokens, *args, **kwargs)
    monkeypatch.setattr(model_module, "recurrent_forward", recurrent_forward)
    model, _ = small_model()
    assert model.generate(torch.zeros(1, 5, dtype=torch.long), 4, prompt_chunk=3).shape == (1, 9)
    assert calls == [3, 2, 1, 1, 1]


def test_generation_never_draws_the_padding_ids_past_the_tokenizer_s():
    torch.manual_seed(0)
    model = BDH(BDHConfig(n_layer=1, n_embd=32, mlp_internal_dim_multiplier=8, vocab_size=320)).eval()
    with torch.no_grad():
        model.lm_head[:, 300:] += 100.0  # the padding rows: by far the likeliest, were they allowed
    drawn = model.generate(torch.zeros(4, 2, dtype=torch.long), 20, vocab_limit=300)[:, 2:]
    assert drawn.max() < 300


def test_loss_is_cross_entropy_of_the_logits_in_float32_whatever_the_model_s_dtype():
    model, _ = small_model()
    idx, tgt = torch.randint(0, 256, (2, 9)), torch.randint(0, 256, (2, 9))
    logits, loss = model(idx, tgt)
    assert torch.allclose(loss, F.cross_entropy(logits.reshape(-1, 256), tgt.reshape(-1)))
    logits, loss = model.to(torch.bfloat16)(idx, tgt)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert torch.equal(loss, F.cross_entropy(logits.float().reshape(-1, 256), tgt.reshape(-1)))


def gradients(model, forward, idx, tgt):
    model.zero_grad()
    logits, loss = forward(idx, tgt)
    loss.backward()
    return logits, {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("device", DEVICES)
def test_fast_path_matches_the_straightforward_implementation_forward_and_gradients(device):
    for checkpointing in (False, True):
        for T in (1, 7, TILE, TILE + 1, 2 * TILE + 37):  # ragged last tiles included
            model, _ = small_model(std=0.1, device=device)
            model.activation_checkpointing = checkpointing
            idx, tgt = torch.randint(0, 256, (2, T), device=device), torch.randint(0, 256, (2, T), device=device)
            fast_logits, fast = gradients(model, model, idx, tgt)
            ref_logits, ref = gradients(model, lambda i, t: reference_forward(model, i, t), idx, tgt)
            assert torch.allclose(fast_logits, ref_logits, rtol=1e-5, atol=1e-5 * ref_logits.abs().max().item())
            for name in ref:
                scale = ref[name].abs().max()
                assert (fast[name] - ref[name]).abs().max() <= 1e-5 * scale, (checkpointing, T, name)


def test_the_straightforward_implementation_shows_the_same_active_latents_to_observe():
    """Assigned to BDH.forward to try an idea, it still runs the evaluation's active-latent counts."""
    model, _ = small_model(std=0.1)
    idx = torch.randint(0, 256, (2, TILE + 5))
    seen = {"fast": [], "reference": []}

    def counter(name):
        return lambda a, b: seen[name].append((a.shape, b.shape, (a > 0).sum((1, 2)).tolist(), (b > 0).sum(1).tolist()))
    with torch.no_grad():
        model(idx, observe=counter("fast"))
        reference_forward(model, idx, observe=counter("reference"))
    assert len(seen["fast"]) == model.config.n_layer and seen["fast"] == seen["reference"]


def test_layer_stack_backward_passes_gradcheck_with_dropout_and_checkpointing():
    torch.manual_seed(0)
    B, T, D, H, N = 2, TILE + 6, 8, 2, 6
    x = torch.randn(B, T, D, dtype=torch.double, requires_grad=True)
    weights = [(torch.randn(*shape, dtype=torch.double) * 0.5).requires_grad_()
               for shape in ((H, D, N), (H, D, N), (H * N, D))]
    phases = rope_phases(rope_frequencies(N), torch.arange(T)).to(torch.complex128)
    for dropout in (0.0, 0.3):
        for checkpoint in (False, True):
            def stack(x, encoder, encoder_v, decoder):
                torch.manual_seed(1)  # the same dropout mask at every evaluation
                return LayerStack.apply(x, encoder, encoder_v, decoder, phases, 2, dropout, checkpoint, PLAIN, None)
            assert torch.autograd.gradcheck(stack, (x, *weights), fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 5, 8), (2, 7, 3), (1,)])  # a multiple of 8 elements, and not
def test_dropout_masks_packed_as_bits_unpack_to_themselves(device, shape):
    mask = torch.rand(shape, device=device) < 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert packed[0] == sum(int(bit) << k for k, bit in enumerate(mask.reshape(-1)[:8].tolist()))  # first bit lowest
    assert torch.equal(unpack_bits(packed, shape), mask)


@pytest.mark.parametrize("device", DEVICES)
def test_recurrent_generation_matches_full_recompute(device):
    model, _ = small_model(std=0.1, device=device)
    prompt = torch.randint(0, 256, (2, 9), device=device)
    greedy = model.generate(prompt, 20, temperature=0, prompt_chunk=4)  # several prompt chunks
    assert greedy.shape == (2, 29) and torch.equal(greedy[:, :9], prompt)
    assert torch.equal(greedy, reference_generate(model, prompt, 20, temperature=0))
    assert torch.equal(model.generate(prompt, 20, top_k=1), greedy)
    assert torch.equal(model.generate(prompt, 20, temperature=1e-45), greedy)  # no nan from logits / 1e-45
    g1, g2 = torch.Generator(device).manual_seed(3), torch.Generator(device).manual_seed(3)
    assert torch.equal(model.generate(prompt, 20, generator=g1), model.generate(prompt, 20, generator=g2))


def test_generation_without_a_prompt_token_says_so():
    model, _ = small_model()
    with pytest.raises(ValueError, match="generation needs at least one prompt token"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 3)


@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_recurrent_state_gives_the_parallel_logits(device):
    """layer_forward with a state: a chunk of 50 positions, then one position at a time."""
    model, cfg = small_model(std=0.1, device=device)
    idx = torch.randint(0, 256, (1, 2 * TILE + 3), device=device)
    states = [torch.zeros(cfg.n_head, 1, cfg.n_latent, cfg.n_embd, device=device) for _ in range(cfg.n_layer)]

    def advance(t0, t1):
        phases = rope_phases(model.rope_freqs, torch.arange(t0, t1, device=device))
        x = layer_norm(model.embed(idx[:, t0:t1]))
        for state in states:
            x, _ = layer_forward(x, model.encoder, model.encoder_v, model.decoder, phases, state=state)
        return x

    hidden = [advance(0, 50)] + [advance(t, t + 1) for t in range(50, idx.size(1))]
    recurrent = torch.cat(hidden, dim=1) @ model.lm_head
    parallel = model(idx)[0]
    assert torch.allclose(recurrent, parallel, atol=1e-5 * parallel.abs().max().item())


@torch.no_grad()
def test_a_bfloat16_model_keeps_its_generation_state_in_float32(monkeypatch):
    """The state sums over every earlier position: kept in bfloat16, each one-position step of
    generation would round the sum, which would drift from what a parallel pass adds up."""
    model, cfg = small_model(std=0.1)
    model, idx = model.bfloat16(), torch.randint(0, 256, (1, 100))
    at_once, stepwise = empty_states(cfg, 1, "cpu"), empty_states(cfg, 1, "cpu")
    weights = model.layer_weights()
    recurrent_forward(model, idx, at_once, 0, weights)
    for t in range(idx.size(1)):
        recurrent_forward(model, idx[:, t:t + 1], stepwise, t, weights)
    assert all(state.dtype == torch.float32 for state in stepwise)
    made = []  # generation's own states (BDH.stream's; the Hugging Face export's: tests/test_export.py)
    monkeypatch.setattr(model_module, "recurrent_forward", lambda m, tokens, states, *rest: made.extend(states)
                        or recurrent_forward(m, tokens, states, *rest))
    model.generate(idx[:, :5], 1)
    assert made and all(state.dtype == torch.float32 for state in made)
    first = at_once[0]  # the first layer's: the same inputs either way, so only the sums' rounding differs
    assert (stepwise[0] - first).norm() < 1e-4 * first.norm()
    model = model.float()  # under autocast too (as evaluation's samples are made): its products stay float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        at_once, stepwise = empty_states(cfg, 1, "cpu"), empty_states(cfg, 1, "cpu")
        recurrent_forward(model, idx, at_once, 0, weights)
        for t in range(idx.size(1)):
            recurrent_forward(model, idx[:, t:t + 1], stepwise, t, weights)
    assert (stepwise[0] - at_once[0]).norm() < 1e-5 * at_once[0].norm()  # (bfloat16 products: 2e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_fast_path_under_low_precision_autocast_is_as_accurate_as_the_reference(device):
    """Training runs under bf16/fp16 autocast. Both implementations are compared with float32
    gradients: the fast path must not lose more. The error of one draw depends on how its
    roundings happen to fall, so the mean over 4 models and inputs is compared."""
    errors = {}  # (dtype, weight, fast or reference) -> relative errors
    for seed in range(4):
        model, _ = small_model(seed=seed, std=0.1, device=device)
        idx = torch.randint(0, 256, (2, TILE + 9), device=device)
        tgt = torch.randint(0, 256, (2, TILE + 9), device=device)
        _, exact = gradients(model, model, idx, tgt)
        for dtype in (torch.bfloat16, torch.float16):
            with torch.autocast(device, dtype=dtype):
                _, fast = gradients(model, model, idx, tgt)
                _, ref = gradients(model, lambda i, t: reference_forward(model, i, t), idx, tgt)
            for name in exact:
                assert fast[name].dtype == torch.float32
                for kind, grads in (("fast", fast), ("reference", ref)):
                    error = float((grads[name] - exact[name]).norm() / exact[name].norm())
                    errors.setdefault((dtype, name, kind), []).append(error)
    for (dtype, name, kind), values in errors.items():
        if kind == "fast":
            fast_error, ref_error = sum(values) / 4, sum(errors[dtype, name, "reference"]) / 4
            assert fast_error < 1.5 * ref_error + 1e-3, (dtype, name, fast_error, ref_error)


def test_rope_angles_are_reduced_to_one_turn_and_accurate_at_long_positions():
    """2*pi*frac(t*f): at position 1,000,000 within 0.02 rad of the exact angle (2*pi*t*f in float32: 0.05 off)."""
    freqs = rope_frequencies(64)[0::2]
    t = torch.tensor([0, 1000, 1_000_000])
    angles = rope_angles(freqs, t)
    assert angles.min() >= 0 and angles.max() < 2 * math.pi
    off = (angles.double() - (t.double()[:, None] * freqs.double()) % 1.0 * (2 * math.pi)) % (2 * math.pi)
    assert torch.minimum(off, 2 * math.pi - off).max() < 0.02


def test_the_rope_table_is_built_without_cpu_cos_and_sin(monkeypatch):
    """On CPU torch.cos and torch.sin run in MKL's vector math, whose first call in a process now
    and then computes its second thread's half of the output by another code path (measured: about
    one fresh process in six; up to 7e-9 off in float64): a run would not repeat bit for bit in
    another process, and exact resume rests on that. rope_phases takes torch.polar instead."""
    freqs, positions = rope_frequencies(64), torch.arange(300)
    angles = rope_angles(freqs[0::2], positions).double()
    expected = torch.complex(angles.cos(), angles.sin())

    def refuse(*args, **kwargs):
        raise AssertionError("cos or sin called")

    for name in ("cos", "sin"):
        monkeypatch.setattr(torch, name, refuse)
        monkeypatch.setattr(torch.Tensor, name, refuse)
    phases = rope_phases(freqs, positions)
    assert phases.dtype == torch.complex64 and (phases - expected).abs().max() < 1e-7


@NEEDS_CUDA
def test_the_compiled_training_step_computes_what_the_eager_one_does_on_cuda(monkeypatch, device="cuda"):
    """torch.compile of the model in training mode (the LayerStack Function, dropout and the hand-written
    backward inside). In float32, with the same dropout masks (inductor's fallback_random draws them as
    eager does), logits and gradients are eager's; under bf16 autocast, as train.py runs it, within bf16
    rounding (with these large random weights compiled and eager bf16 gradients differ by up to ~7%)."""
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    model, _ = small_model(std=0.1, device=device)
    model.config.dropout = 0.2
    model.train()
    idx = torch.randint(0, 256, (2, TILE + 9), device=device)
    tgt = torch.randint(0, 256, (2, TILE + 9), device=device)
    compiled = torch.compile(model)
    for dtype, logits_tolerance, gradient_tolerance in ((torch.float32, 1e-5, 1e-3), (torch.bfloat16, 2e-2, 0.15)):
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            torch.manual_seed(5)
            eager_logits, eager = gradients(model, model, idx, tgt)
            torch.manual_seed(5)
            compiled_logits, compiled_grads = gradients(model, compiled, idx, tgt)
        assert (compiled_logits - eager_logits).float().norm() <= logits_tolerance * eager_logits.float().norm()
        for name in eager:
            assert (compiled_grads[name] - eager[name]).norm() <= gradient_tolerance * eager[name].norm(), (dtype, name)


def test_activation_checkpointing_keeps_less_for_backward():
    """The equivalence tests above pass whether or not checkpointing saves anything: count the bytes
    autograd keeps between forward and backward."""
    def saved_bytes(model, idx):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            _, loss = model(idx, idx)
        loss.backward()
        return sum(sizes)
    torch.manual_seed(0)
    model = BDH(BDHConfig(n_layer=4, n_embd=32, n_head=2, mlp_internal_dim_multiplier=8, dropout=0.0)).train()
    idx = torch.randint(0, 256, (2, TILE + 5))
    full = saved_bytes(model, idx)
    model.activation_checkpointing = True
    assert saved_bytes(model, idx) < 0.5 * full  # measured: 0.33


def test_the_flop_count_is_the_forward_s_matmuls_with_the_causal_half_of_attention():
    """training_flops_per_token: 3 x the forward's matmul FLOPs, of which attention counts only the
    causal half of the (T, T) scores that the forward computes whole."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg = BDHConfig(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=4, dropout=0.0)
    T = 16
    with FlopCounterMode(display=False) as counter:
        BDH(cfg)(torch.randint(0, cfg.vocab_size, (3, T)))
    L, H, N, D = cfg.n_layer, cfg.n_head, cfg.n_latent, cfg.n_embd
    masked_half = L * 2 * H * (T / 2) * (N + D)
    assert counter.get_total_flops() / (3 * T) == cfg.training_flops_per_token(T) / 3 + masked_half


def test_a_forward_without_gradients_keeps_no_layer_activations(monkeypatch):
    """Evaluation and generation (no_grad) keep only what activation checkpointing keeps: nothing of a
    layer's latents waits for a backward that never comes."""
    kept_less, real_apply = [], model_module.LayerStack.apply
    monkeypatch.setattr(model_module.LayerStack, "apply", lambda *args: kept_less.append(args[7]) or real_apply(*args))
    bdh = BDH(BDHConfig(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=4, vocab_size=256)).eval()
    idx = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        logits, _ = bdh(idx)
    assert torch.equal(logits, bdh(idx)[0].detach()) and kept_less == [True, False]
