"""LoRA-Reins: learnable low-rank tokens that refine the frozen backbone's features after every block (METHOD §2.3).

For block l with tokens T_l = A_l · B_l (m × D) and patch tokens P (B × N × D):

    A_att = softmax_over_m(P T_lᵀ / sqrt(D))                  # all m tokens compete in the softmax
    Δ     = A_att[:, :, 1:] · mlp_token2feat(T_l[1:])          # token 0 is a sink: it carries no value
    Δ     = mlp_delta_f(Δ + P)
    P     ← P + s · Δ

Parameter names follow Rein (``learnable_tokens_a/b``, ``scale``, ``mlp_token2feat``, ``mlp_delta_f``); Rein's
``transform``/``merge`` query layers are not created (QueryDiff builds its head queries elsewhere, METHOD §3.4).
The module's ``forward(tokens, layer)`` is the adapter hook of ``DinoVisionTransformer.forward``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from qd_core.attention import agent_attention
from qd_core.config import ReinsConfig


def token_init_bound(embed_dim: int, lora_dim: int, patch_size: int = 16) -> float:
    """Half-width v of Rein's U(-v, v) token init: sqrt(6 / (3·p² + sqrt(D·r))).

    p is the backbone's patch size, as in Rein's code (METHOD writes 3·16², where 16 is both the patch size and
    the rank of the default config). For D = 1024, r = 16, p = 16: v ≈ 0.0818.
    """
    return math.sqrt(6.0 / (3 * patch_size * patch_size + math.sqrt(embed_dim * lora_dim)))


class LoRAReins(nn.Module):
    """Per-layer low-rank Rein tokens and the shared token-to-feature refinement."""

    def __init__(self, num_layers: int, embed_dim: int, cfg: ReinsConfig, *, patch_size: int = 16) -> None:
        super().__init__()
        for name, value in [("num_layers", num_layers), ("embed_dim", embed_dim), ("token_length", cfg.token_length),
                            ("lora_dim", cfg.lora_dim), ("patch_size", patch_size)]:
            if value <= 0:
                raise ValueError(f"LoRAReins {name} = {value}: expected a positive integer")
        self.num_layers, self.embed_dim = num_layers, embed_dim
        self.token_length, self.lora_dim = cfg.token_length, cfg.lora_dim
        self.learnable_tokens_a = nn.Parameter(torch.empty(num_layers, cfg.token_length, cfg.lora_dim))
        self.learnable_tokens_b = nn.Parameter(torch.empty(num_layers, cfg.lora_dim, embed_dim))
        self.scale = nn.Parameter(torch.tensor(float(cfg.scale_init)))
        # nn.Linear's default init is Rein's kaiming_uniform(a=sqrt(5)) with the default bias.
        self.mlp_token2feat = nn.Linear(embed_dim, embed_dim)
        self.mlp_delta_f = nn.Linear(embed_dim, embed_dim)
        bound = token_init_bound(embed_dim, cfg.lora_dim, patch_size)
        nn.init.uniform_(self.learnable_tokens_a, -bound, bound)
        nn.init.uniform_(self.learnable_tokens_b, -bound, bound)

    def tokens(self, layer: int) -> Tensor:
        """Rein tokens T_l = A_l · B_l of block ``layer``, (m, D)."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer = {layer}: expected a block index in [0, {self.num_layers})")
        return self.learnable_tokens_a[layer] @ self.learnable_tokens_b[layer]

    def all_tokens(self) -> Tensor:
        """Rein tokens of every block, (L, m, D)."""
        return torch.matmul(self.learnable_tokens_a, self.learnable_tokens_b)

    def token_values(self, tokens: Tensor) -> Tensor:
        """The attention values of Rein tokens: (..., m, D) → (..., m, D), token 0's row zero.

        Token 0 stays in the softmax (a patch can put its mass there and opt out) but contributes no value.
        """
        values = self.mlp_token2feat(tokens)
        return torch.cat([torch.zeros_like(values[..., :1, :]), values[..., 1:, :]], dim=-2)

    def bind(self, tokens: Tensor) -> Callable[[Tensor, int], Tensor]:
        """The backbone's adapter for one forward pass, with every block's tokens (L, m, D) (``all_tokens()``)
        and their values computed once for all blocks: two batched products instead of two per block, which
        at batch 1 are a few dozen kernel launches of a few µs of work each."""
        values = self.token_values(tokens)
        return lambda x, layer: self(x, layer, tokens[layer], values[layer])

    def forward(self, x: Tensor, layer: int, tokens: Tensor | None = None, values: Tensor | None = None) -> Tensor:
        """Refine the patch tokens of block ``layer``'s output.

        x: (B, 1+N, D) tokens, CLS first (the CLS token passes through unchanged); tokens, values: block
        ``layer``'s (m, D) Rein tokens and values when already computed (see ``bind``). Returns (B, 1+N, D).
        """
        if x.dim() != 3 or x.shape[-1] != self.embed_dim or x.shape[1] < 2:
            raise ValueError(f"x: expected (B, 1+N, {self.embed_dim}) tokens with a CLS token and N >= 1 patches, "
                             f"got shape {tuple(x.shape)}")
        cls, patches = x[:, :1], x[:, 1:]
        t = self.tokens(layer) if tokens is None else tokens
        values = self.token_values(t) if values is None else values
        # One head of width D; the m keys are shared by the whole batch, so they keep a batch dim of 1.
        delta = agent_attention(patches[:, None], t[None, None], values[None, None], scale=self.embed_dim ** -0.5)
        delta = self.mlp_delta_f(delta[:, 0] + patches)
        return torch.cat([cls, torch.addcmul(patches, delta, self.scale)], dim=1)
