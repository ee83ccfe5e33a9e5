import math

import torch
import torch.nn.functional as F

from model import BDH, BDHConfig


def reference_logits(params, cfg: BDHConfig, idx):
    """BDH_SPEC.md written out directly: per head, explicit phases and pair rotation, float64."""
    D, H, N, L = cfg.n_embd, cfg.n_head, cfg.n_latent, cfg.n_layer
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


def small_model(seed=0, std=0.3, **kw):
    torch.manual_seed(seed)
    cfg = BDHConfig(n_layer=3, n_embd=32, n_head=4, mlp_internal_dim_multiplier=8, dropout=0.0, **kw)
    model = BDH(cfg)
    with torch.no_grad():  # larger random weights than the init, so every term matters
        for prm in model.parameters():
            prm.normal_(0.0, std)
    return model.eval(), cfg


def test_parameter_names_and_shapes_are_the_checkpoint_format():
    cfg = BDHConfig()
    shapes = {k: tuple(v.shape) for k, v in BDH(cfg).state_dict().items()}
    assert shapes == {"embed.weight": (256, 256), "encoder": (4, 256, 8192), "encoder_v": (4, 256, 8192),
                      "decoder": (4 * 8192, 256), "lm_head": (256, 256)}
    assert abs(sum(math.prod(s) for s in shapes.values()) / 1e6 - 25.3) < 0.05


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


def test_loss_is_cross_entropy_of_the_logits():
    model, _ = small_model()
    idx, tgt = torch.randint(0, 256, (2, 9)), torch.randint(0, 256, (2, 9))
    logits, loss = model(idx, tgt)
    assert torch.allclose(loss, F.cross_entropy(logits.reshape(-1, 256), tgt.reshape(-1)))


def test_generate_greedy_and_sampling():
    model, _ = small_model()
    prompt = torch.randint(0, 256, (1, 5))
    greedy = model.generate(prompt, 8, temperature=0)
    assert greedy.shape == (1, 13) and torch.equal(greedy[:, :5], prompt)
    expected = prompt
    for _ in range(8):  # full recompute, argmax at each step
        expected = torch.cat([expected, model(expected)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, expected)
    assert torch.equal(model.generate(prompt, 8, top_k=1), greedy)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(model.generate(prompt, 8, generator=g1), model.generate(prompt, 8, generator=g2))
