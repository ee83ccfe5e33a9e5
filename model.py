"""BDH ("Baby Dragon Hatchling", arXiv 2509.26507): the model, exactly as ../shared/BDH_SPEC.md.

Parameter names and shapes are the checkpoint format: embed.weight, encoder, encoder_v,
decoder, lm_head. The same encoder / encoder_v / decoder are used by every layer.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ROPE_THETA = 2.0**16
LN_EPS = 1e-5


@dataclass
class BDHConfig:
    n_layer: int = 6
    n_embd: int = 256
    dropout: float = 0.1
    n_head: int = 4
    mlp_internal_dim_multiplier: int = 128
    vocab_size: int = 256

    @property
    def n_latent(self) -> int:  # N in the spec: latent neurons per head
        return self.mlp_internal_dim_multiplier * self.n_embd // self.n_head


def rope_frequencies(n_latent: int) -> torch.Tensor:
    """f_j = 1 / theta^(q(j)/N) / (2*pi) with q(j) = 2*floor(j/2), in float32."""
    q = (torch.arange(n_latent, dtype=torch.float32) / 2).floor() * 2
    return 1.0 / (ROPE_THETA ** (q / n_latent)) / (2 * math.pi)


def rope_cos_sin(freqs: torch.Tensor, T: int):
    """(T, N) tables of cos and sin of p_{t,j} = 2*pi*frac(t*f_j), computed once per forward."""
    t = torch.arange(T, dtype=torch.float32, device=freqs.device).unsqueeze(1)
    phases = (t * freqs) % 1.0 * (2 * math.pi)
    return phases.cos(), phases.sin()


def rope(a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (a_2i, a_2i+1) of the last dim by the phase of their position."""
    a_rot = torch.stack((-a[..., 1::2], a[..., 0::2]), dim=-1).view(a.shape)
    return (a * cos).to(a.dtype) + (a_rot * sin).to(a.dtype)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.size(-1),), eps=LN_EPS)


class BDH(nn.Module):
    def __init__(self, config: BDHConfig):
        super().__init__()
        self.config = config
        D, H, N, V = config.n_embd, config.n_head, config.n_latent, config.vocab_size
        self.embed = nn.Embedding(V, D)
        self.encoder = nn.Parameter(torch.empty(H, D, N))
        self.encoder_v = nn.Parameter(torch.empty(H, D, N))
        self.decoder = nn.Parameter(torch.empty(H * N, D))
        self.lm_head = nn.Parameter(torch.empty(D, V))
        self.drop = nn.Dropout(config.dropout)
        self.register_buffer("rope_freqs", rope_frequencies(N), persistent=False)
        # The original implementation stored its RoPE table as "attn.freqs"; it is derived
        # from the config, so drop it and let such state_dicts load unchanged.
        self.register_load_state_dict_pre_hook(self._drop_derived_buffers)
        for p in (self.embed.weight, self.encoder, self.encoder_v, self.decoder, self.lm_head):
            nn.init.normal_(p, mean=0.0, std=0.02)

    @staticmethod
    def _drop_derived_buffers(module, state_dict, prefix, *args):
        state_dict.pop(prefix + "attn.freqs", None)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        C = self.config
        B, T = idx.shape
        D, H, N = C.n_embd, C.n_head, C.n_latent
        cos, sin = rope_cos_sin(self.rope_freqs, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril(diagonal=-1)

        x = layer_norm(self.embed(idx).unsqueeze(1))  # (B, 1, T, D)
        for _ in range(C.n_layer):
            a = F.relu(x @ self.encoder)  # (B, H, T, N)
            r = rope(a, cos, sin)
            scores = (r @ r.transpose(-1, -2)).masked_fill(~causal, 0.0)  # strict: s < t
            y = layer_norm(scores @ x)  # (B, H, T, D)
            b = F.relu(y @ self.encoder_v)  # (B, H, T, N)
            z = self.drop(a * b)
            z = z.transpose(1, 2).reshape(B, 1, T, H * N)  # concat_heads, head-major
            m = layer_norm(z @ self.decoder)  # (B, 1, T, D)
            x = layer_norm(x + m)
        logits = x.view(B, T, D) @ self.lm_head
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx (B, T). temperature 0 means greedy."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx)
            logits = logits[:, -1, :].float()
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                next_token = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, next_token), dim=1)
        return idx
