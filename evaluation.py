"""What an evaluation measures: the validation loss (and its bits per byte), the share of active
latent neurons in each layer, and a generated sample. Give these the uncompiled model in eval mode
(the caller switches it): eval mode and generation lengths would each make a compiled one recompile.

The latents a and b of MODEL.md are the paper's reference code's x_sparse and y_sparse: the log line and
the metrics keep those names (active latents x, y; sparsity_x, sparsity_y, which hold the share of active
latents: higher is denser)."""
import hashlib
import math

import torch

from distributed import Ranks, full_weights
from model import SAMPLE_TEMPERATURE

SAMPLE_TOKENS = 200
SAMPLE_PROMPT_TOKENS = 32  # the start of the first validation window


def validation_fingerprint(val_batches) -> str:
    """A hash of the validation batches' tokens: equal fingerprints, the same losses measured
    (resume_validation.validation_change), wherever the files are and however the settings are written."""
    digest = hashlib.blake2b(digest_size=8)
    for x, y in val_batches:
        digest.update(repr((tuple(x.shape), x.dtype)).encode())
        digest.update(x.numpy().tobytes())
        digest.update(y[:, -1].numpy().tobytes())  # y is x shifted by one: its last column is all that is new
    return digest.hexdigest()


def tokens_per_byte(val_batches, tokenizer) -> float:
    """The validation targets' tokens per UTF-8 byte they decode to: bits per byte = loss x this / ln 2.
    Bytes and byte-level BPEs: the sum of each token's bytes (exact). Other tokenizers: each target
    window decoded as text, between separators (one byte each), since a token's bytes can depend on
    its neighbours (SentencePiece's '▁' alone decodes to nothing, inside a text to a space)."""
    n_tokens = sum(y.numel() for _, y in val_batches)
    if tokenizer.exact_bytes:
        return n_tokens / sum(int(tokenizer.token_bytes[y.numpy()].sum()) for _, y in val_batches)
    n_bytes = 0
    for _, y in val_batches:
        for window in y.tolist():
            separators = [i for i, token in enumerate(window) if token == tokenizer.separator]
            texts = zip([-1] + separators, separators + [len(window)])  # (before, after) each text
            n_bytes += len(separators) + sum(len(tokenizer.decode(window[before + 1:after]).encode("utf-8"))
                                             for before, after in texts)
    return n_tokens / n_bytes


@torch.no_grad()
def validation_loss(model, val_batches, device, compute, ranks: Ranks) -> tuple[float, tuple[list, list]]:
    """(mean validation loss, the fractions of the a and of the b latents that are non-zero, per
    layer). Each batch counts by its windows (the last may be short). Rank r takes batches r,
    r + world_size, ...; every rank runs as many forwards (FSDP gathers weights in each), a rank short
    of a batch repeats the first one and does not count it."""
    total_dtype = torch.float32 if device.type == "mps" else torch.float64  # mps has no float64
    totals = torch.zeros(2, dtype=total_dtype, device=device)  # loss x windows summed, windows
    active = torch.zeros(model.config.n_layer, 3, dtype=total_dtype, device=device)  # a, b non-zero; elements
    calls = 0

    def count_active(a, b):  # called by each layer in turn
        nonlocal calls
        layer = active[calls % len(active)]
        # a and b are relus' outputs: non-zero is active. (count_nonzero makes no temporary; on CPU (a > 0).sum()
        # made a bool and an int copy of a, which took an evaluation with activation checkpointing past the step's peak)
        layer[0] += torch.count_nonzero(a)
        layer[1] += torch.count_nonzero(b)
        layer[2] += a.numel()
        calls += 1

    for i in range(math.ceil(len(val_batches) / ranks.world_size)):
        k = ranks.rank + i * ranks.world_size
        counted = k < len(val_batches)
        x, y = val_batches[k if counted else 0]
        with compute:
            _, loss = model(x.to(device), y.to(device), observe=count_active if counted else None)
        if counted:
            totals[0] += loss.to(total_dtype) * len(x)
            totals[1] += len(x)
    loss_sum, windows = ranks.total(totals).tolist()
    active = ranks.total(active)
    return loss_sum / windows, ((active[:, 0] / active[:, 2]).tolist(), (active[:, 1] / active[:, 2]).tolist())


@torch.no_grad()
def generate_sample(model, val_batches, device, compute, generator, ranks: Ranks, tokenizer) -> tuple[str, str]:
    """(prompt, continuation): the first SAMPLE_PROMPT_TOKENS of the first validation window and the
    SAMPLE_TOKENS the model writes after them, at SAMPLE_TEMPERATURE, with the same random draws at every
    evaluation."""
    prompt = val_batches[0][0][:1, :SAMPLE_PROMPT_TOKENS].to(device)
    generator.manual_seed(0)
    with compute, full_weights(model, ranks):
        out = model.generate(prompt, SAMPLE_TOKENS, temperature=SAMPLE_TEMPERATURE, top_k=None, generator=generator,
                             vocab_limit=tokenizer.vocab_size)
    prompt_text, whole = tokenizer.decode(prompt[0].tolist()), tokenizer.decode(out[0].tolist())
    if whole.startswith(prompt_text):  # (a character split between the two decodes apart)
        return tokenizer.shown(prompt_text), tokenizer.shown(whole[len(prompt_text):])
    return tokenizer.shown(prompt_text), tokenizer.shown(tokenizer.decode(out[0, prompt.shape[1]:].tolist()))


def evaluate(model, val_batches, device, compute, generator, ranks: Ranks, tokenizer, val_tokens_per_byte) -> dict:
    """One evaluation's metrics record (without its step): validation loss, bits per byte, active
    latents per layer, the sample and its prompt. `model` in eval mode; val_tokens_per_byte from
    tokens_per_byte."""
    val_loss, (active_x, active_y) = validation_loss(model, val_batches, device, compute, ranks)
    prompt, continuation = generate_sample(model, val_batches, device, compute, generator, ranks, tokenizer)
    return {"val_loss": val_loss, "val_bits_per_byte": val_loss * val_tokens_per_byte / math.log(2),
            "sparsity_x": active_x, "sparsity_y": active_y, "sample_prompt": prompt, "sample": continuation}
