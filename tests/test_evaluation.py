"""evaluation.py: the validation loss, the share of active latents per layer, the sample."""
import contextlib
import math

import pytest
import torch

import evaluation
from distributed import Ranks
from evaluation import evaluate, generate_sample, tokens_per_byte, validation_fingerprint, validation_loss
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
    s = torch.arange(8)  # one window of 7, or two of 3: the very same bytes hashed, but for the windows' shape
    one_window = [(s[:7].view(1, 7), s[1:].view(1, 7))]
    two_windows = [(s[0:3].view(1, 3), s[1:4].view(1, 3)), (s[4:7].view(1, 3), s[5:8].view(1, 3))]
    assert validation_fingerprint(one_window) != validation_fingerprint(two_windows)


# ---- found by mutating evaluation.py: bytes of non-ASCII text, the sample's temperature and vocabulary, a
# character split between prompt and continuation, the evaluation record

CPU, PLAIN = torch.device("cpu"), contextlib.nullcontext()


class TextTokenizer:
    """A tokenizer whose windows are decoded as text (exact_bytes False): a token a byte, 0 the separator."""
    exact_bytes, separator = False, 0

    @staticmethod
    def decode(ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_tokens_per_byte_counts_the_utf8_bytes_of_non_ascii_text_not_its_characters():
    text = "café à la crème".encode()  # 15 characters, 18 bytes
    targets = torch.tensor([list(text) + [0] + list(text) + [0]])
    assert tokens_per_byte([(None, targets)], TextTokenizer()) == pytest.approx(1.0)  # a token a byte
    assert tokens_per_byte([(None, targets)], ByteTokenizer()) == pytest.approx(1.0)


def test_the_sample_is_the_models_own_continuation_at_temperature_0_8_below_the_tokenizers_vocabulary():
    torch.manual_seed(0)
    model = BDH(BDHConfig(n_layer=1, n_embd=32, n_head=2, mlp_internal_dim_multiplier=4, vocab_size=320)).eval()
    batches = [(torch.randint(1, 256, (2, 40), generator=torch.Generator().manual_seed(0)), None)]
    _, continuation = generate_sample(model, batches, CPU, PLAIN, torch.Generator(), Ranks(), ByteTokenizer())
    prompt = batches[0][0][:1, :evaluation.SAMPLE_PROMPT_TOKENS]
    out = model.generate(prompt, evaluation.SAMPLE_TOKENS, temperature=0.8, generator=torch.Generator().manual_seed(0),
                         vocab_limit=256)
    assert continuation == ByteTokenizer.shown(ByteTokenizer().decode(out[0, prompt.shape[1]:].tolist()))


class Writes:
    """A model whose generation appends fixed tokens."""
    def __init__(self, tokens):
        self.tokens = torch.tensor([tokens])

    def generate(self, prompt, *args, **kwargs):
        return torch.cat([prompt, self.tokens], 1)


def test_a_continuation_that_completes_the_prompts_last_character_shows_only_the_new_tokens():
    prompt = list(b"x" * (evaluation.SAMPLE_PROMPT_TOKENS - 1)) + [0xC3]  # the first byte of an 'é'
    batches = [(torch.tensor([prompt + [0x41] * 8]), None)]
    shown_prompt, continuation = generate_sample(Writes([0xA9, 0x62, 0x63]), batches, CPU, PLAIN, torch.Generator(),
                                                 Ranks(), ByteTokenizer())
    assert shown_prompt == "x" * 31 + "\ufffd"
    assert continuation == "\ufffdbc"  # the 'é' split: its second byte alone, not the whole text again


def test_the_evaluation_record_has_the_a_latents_as_sparsity_x_and_the_bits_per_byte_in_bits():
    torch.manual_seed(0)
    model = BDH(BDHConfig(n_layer=2, n_embd=32, n_head=2, mlp_internal_dim_multiplier=4)).eval()
    batches = [(torch.randint(0, 256, (2, 40)), torch.randint(0, 256, (2, 40))) for _ in range(2)]
    loss, (active_x, active_y) = validation_loss(model, batches, CPU, PLAIN, Ranks())
    record = evaluate(model, batches, CPU, PLAIN, torch.Generator(), Ranks(), ByteTokenizer(), 0.5)
    assert active_x != active_y
    assert (record["sparsity_x"], record["sparsity_y"]) == (active_x, active_y)
    assert record["val_loss"] == loss
    assert record["val_bits_per_byte"] == pytest.approx(loss * 0.5 / math.log(2), rel=1e-12)
