"""evaluation.py: the validation loss, the share of active latents per layer, the sample."""
import contextlib

import pytest
import torch

from distributed import Ranks
from evaluation import generate_sample, validation_fingerprint, validation_loss
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


class OneOfTwoRanks(Ranks):
    """Rank `rank` of two, in this process: total() adds what the other rank's totals were."""
    def __init__(self, rank, others):
        super().__init__(rank=rank, world_size=2)
        self.others, self.totals = others, []

    def total(self, values):
        self.totals.append(values)
        return values + self.others.pop(0) if self.others else values


def test_the_validation_loss_is_the_mean_over_the_windows_each_counted_once_across_ranks():
    torch.manual_seed(0)
    model = BDH(BDHConfig(n_layer=1, n_embd=32, n_head=2, mlp_internal_dim_multiplier=4)).eval()
    batches = [(torch.randint(0, 256, (n, 8)), torch.randint(0, 256, (n, 8))) for n in (3, 3, 1)]  # the last short
    with torch.no_grad():
        window_losses = [model(x[i:i + 1], y[i:i + 1])[1].item() for x, y in batches for i in range(len(x))]
    expected = sum(window_losses) / len(window_losses)
    cpu, plain = torch.device("cpu"), contextlib.nullcontext()
    alone, active = validation_loss(model, batches, cpu, plain, Ranks())
    assert alone == pytest.approx(expected, rel=1e-6)
    second = OneOfTwoRanks(1, [])  # batch 1, and batch 0 again to keep step (not counted)
    validation_loss(model, batches, cpu, plain, second)
    first = OneOfTwoRanks(0, second.totals)  # batches 0 and 2, with rank 1's totals
    loss, (active_x, active_y) = validation_loss(model, batches, cpu, plain, first)
    assert loss == pytest.approx(expected, rel=1e-6)
    assert (active_x, active_y) == (pytest.approx(active[0], abs=1e-12), pytest.approx(active[1], abs=1e-12))


def test_the_sample_continues_the_first_validation_window_with_the_same_draws_each_time():
    model = BDH(BDHConfig(n_layer=1, n_embd=32, n_head=2, mlp_internal_dim_multiplier=4)).eval()
    batches = [(torch.randint(1, 256, (2, 40), generator=torch.Generator().manual_seed(0)), None)]
    batches[0][0][0, 5] = 0  # a separator in the prompt: shown as <|endoftext|>, not a NUL
    generator = torch.Generator()
    samples = [generate_sample(model, batches, torch.device("cpu"), contextlib.nullcontext(), generator, Ranks(),
                               ByteTokenizer()) for _ in range(2)]
    prompt, continuation = samples[0]
    assert samples[0] == samples[1] and "\x00" not in prompt + continuation
    assert prompt == ByteTokenizer.shown(ByteTokenizer().decode(batches[0][0][0, :32].tolist()))
    assert prompt.count("<|endoftext|>") == 1
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


def test_the_fingerprint_of_the_validation_batches_tells_every_token_apart():
    x = torch.arange(12).view(2, 6)
    batches = [(x, x + 1)]  # y: x shifted by one
    fingerprint = validation_fingerprint(batches)
    assert validation_fingerprint([(x.clone(), x + 1)]) == fingerprint
    for changed in ((x.clone().index_put_((torch.tensor(1), torch.tensor(0)), torch.tensor(99)), x + 1),
                    (x, torch.cat([(x + 1)[:, :-1], torch.tensor([[98], [99]])], 1)),  # the last targets alone
                    (x.view(3, 4), (x + 1).view(3, 4))):  # the same tokens in other windows
        assert validation_fingerprint([changed]) != fingerprint
