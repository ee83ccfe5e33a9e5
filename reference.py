"""The straightforward implementation of BDH (MODEL.md), as the original BDH code writes it: the
full T x T attention product masked afterwards, autograd keeping every intermediate, and generation
that re-runs the whole sequence for every new token.

It is the yardstick: the tests check model.py against it (forward, gradients and generation), and
bench.py measures model.py's forward and backward against it side by side. It shares model.BDH's
parameters.
"""
import torch
import torch.nn.functional as F

from model import BDH, layer_norm, rope_angles


def rope_cos_sin(freqs: torch.Tensor, positions: torch.Tensor):
    """(T, N) float32 tables of cos and sin of the angles, shared by all layers."""
    angles = rope_angles(freqs, positions)
    return angles.cos(), angles.sin()


def rope(a, cos, sin):
    a_rot = torch.stack((-a[..., 1::2], a[..., 0::2]), dim=-1).view(a.shape)
    return (a * cos).to(a.dtype) + (a_rot * sin).to(a.dtype)


def reference_forward(model: BDH, idx, targets=None, observe=None):
    """(logits, loss), as BDH.forward; observe(a, b), if given, sees each layer's two sparse latents."""
    config = model.config
    B, T = idx.shape
    D, H, N = config.n_embd, config.n_head, config.n_latent
    cos, sin = rope_cos_sin(model.rope_freqs, torch.arange(T, device=idx.device))
    x = layer_norm(model.embed(idx).unsqueeze(1))
    for _ in range(config.n_layer):
        a = F.relu(x @ model.encoder)
        r = rope(a, cos, sin)
        scores = (r @ r.transpose(-1, -2)).tril(diagonal=-1)
        y = layer_norm(scores @ x)
        b = F.relu(y @ model.encoder_v)
        if observe is not None:  # in model.py's layout: a (H, B, T, N), b (H, B*T, N)
            observe(a.transpose(0, 1), b.transpose(0, 1).reshape(config.n_head, B * T, -1))
        z = F.dropout(a * b, config.dropout, training=model.training)
        z = z.transpose(1, 2).reshape(B, 1, T, H * N)
        x = layer_norm(x + layer_norm(z @ model.decoder))
    logits = x.view(B, T, D) @ model.lm_head
    loss = None
    if targets is not None:
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
    return logits, loss


@torch.no_grad()
def reference_generate(model: BDH, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
    """Full recompute: the whole sequence goes through the model again for every new token."""
    for _ in range(max_new_tokens):
        logits, _ = reference_forward(model, idx)
        idx = torch.cat((idx, model.sample_next(logits[:, -1], temperature, top_k, generator)), dim=1)
    return idx
