"""What an evaluation measures: the validation loss (and its bits per byte), the share of active
latent neurons in each layer, and a generated sample."""
import math

import torch

from distributed import Ranks, full_weights

SAMPLE_TOKENS = 200


def tokens_per_byte(val_batches, tokenizer) -> float:
    """The validation targets' tokens per UTF-8 byte they decode to: bits per byte = loss x this / ln 2."""
    return (sum(y.numel() for _, y in val_batches)
            / sum(int(tokenizer.token_bytes[y.numpy()].sum()) for _, y in val_batches))


@torch.no_grad()
def evaluate(model, val_batches, device, compute, generator, ranks: Ranks, tokenizer):
    """(mean validation loss, a sample continuing the first validation window, the fractions of
    the x and y latents that are non-zero, per layer). Rank r takes batches r, r + world_size, ...;
    every rank runs as many forwards (FSDP gathers weights in each), a rank short of a batch
    repeats the first one and does not count it. Runs the uncompiled model: eval mode and
    generation lengths would each trigger a recompile."""
    model.eval()
    total_dtype = torch.float32 if device.type == "mps" else torch.float64  # mps has no float64
    totals = torch.zeros(2, dtype=total_dtype, device=device)  # loss sum, batches
    active = torch.zeros(model.config.n_layer, 3, dtype=total_dtype, device=device)  # x, y non-zero; elements
    layers = []

    def count_active(a, b):  # called by each layer in turn
        layer = active[len(layers) % len(active)]
        layer[0] += (a > 0).sum()
        layer[1] += (b > 0).sum()
        layer[2] += a.numel()
        layers.append(layer)

    for i in range(math.ceil(len(val_batches) / ranks.world_size)):
        k = ranks.rank + i * ranks.world_size
        x, y = val_batches[k if k < len(val_batches) else 0]
        with compute:
            _, loss = model(x.to(device), y.to(device), observe=count_active if k < len(val_batches) else None)
        if k < len(val_batches):
            totals += torch.stack([loss.to(total_dtype), loss.new_ones((), dtype=total_dtype)])
    loss_sum, count = ranks.total(totals).tolist()
    active = ranks.total(active)
    sparsity = ((active[:, 0] / active[:, 2]).tolist(), (active[:, 1] / active[:, 2]).tolist())
    prompt = val_batches[0][0][:1, :32].to(device)
    generator.manual_seed(0)
    with compute, full_weights(model, ranks):
        out = model.generate(prompt, SAMPLE_TOKENS, temperature=0.8, top_k=None, generator=generator,
                             vocab_limit=tokenizer.vocab_size)
    model.train()
    return loss_sum / count, tokenizer.decode(out[0].tolist()), sparsity
