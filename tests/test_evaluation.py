"""evaluation.py: the validation loss, the share of active latents per layer, the sample."""
import contextlib

import pytest
import torch

from distributed import Ranks
from evaluation import generate_sample, validation_loss
from model import BDH, BDHConfig, layer_norm
from reference import rope, rope_cos_sin
from tokenizer import ByteTokenizer


def test_evaluation_builds_no_autograd_graph():
    model = BDH(BDHConfig(n_layer=1, n_embd=32, n_head=2, mlp_internal_dim_multiplier=4))
    grad_modes = []
    model.register_forward_pre_hook(lambda module, args: grad_modes.append(torch.is_grad_enabled()))
    batches = [(torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8)))]
    loss, _ = validation_loss(model.eval(), batches, torch.device("cpu"), contextlib.nullcontext(), Ranks())
    assert grad_modes == [False] and loss > 0


def test_the_sample_continues_the_first_validation_window_with_the_same_draws_each_time():
    model = BDH(BDHConfig(n_layer=1, n_embd=32, n_head=2, mlp_internal_dim_multiplier=4)).eval()
    batches = [(torch.randint(0, 256, (2, 40)), torch.randint(0, 256, (2, 40)))]
    generator = torch.Generator()
    samples = [generate_sample(model, batches, torch.device("cpu"), contextlib.nullcontext(), generator, Ranks(),
                               ByteTokenizer()) for _ in range(2)]
    prompt, continuation = samples[0]
    assert samples[0] == samples[1] and prompt == ByteTokenizer().decode(batches[0][0][0, :32].tolist())
    assert continuation and not continuation.startswith(prompt)


def test_evaluation_sparsity_is_the_share_of_non_zero_latents_per_layer():
    torch.manual_seed(0)
    model = BDH(BDHConfig(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=4, dropout=0.0))
    batches = [(torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8))) for _ in range(3)]
    _, (x_active, y_active) = validation_loss(model.eval(), batches, torch.device("cpu"), contextlib.nullcontext(),
                                              Ranks())
    # the same fractions counted directly, with the straightforward formulation of the layers
    x_count, y_count, total = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), 0
    with torch.no_grad():
        cos, sin = rope_cos_sin(model.rope_freqs, torch.arange(8))
        for idx, _ in batches:
            x = layer_norm(model.embed(idx).unsqueeze(1))
            for layer in range(2):
                a = torch.relu(x @ model.encoder)
                r = rope(a, cos, sin)
                b = torch.relu(layer_norm((r @ r.transpose(-1, -2)).tril(-1) @ x) @ model.encoder_v)
                x_count[layer] += (a > 0).sum()
                y_count[layer] += (b > 0).sum()
                z = (a * b).transpose(1, 2).reshape(2, 1, 8, -1)
                x = layer_norm(x + layer_norm(z @ model.decoder))
            total += a.numel()
    assert x_active == pytest.approx((x_count / total).tolist(), abs=1e-12)
    assert y_active == pytest.approx((y_count / total).tolist(), abs=1e-12)
    assert all(0 < f < 1 for f in x_active + y_active)
