"""Small reusable layers shared by the backbone, the agent-query encoder and the head."""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from qd_core.attention import agent_attention, attention, masked_attention

class Mlp(nn.Module):
    """Linear → activation → Linear. Names ``fc1``/``fc2`` match DINOv2 checkpoints."""

    def __init__(self, dim: int, hidden: int, out: int | None = None, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act()
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., dim) → (..., out)."""
        return self.fc2(self.act(self.fc1(x)))


class MultiheadAttention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections, routed through ``qd_core.attention``.

    ``kind`` picks the entry point: ``plain`` (self/cross attention), ``agent`` (many queries over few keys, keys
    may be shared over the batch), ``masked`` (Mask2Former masked cross-attention).
    """

    def __init__(self, dim: int, num_heads: int, kind: Literal["plain", "agent", "masked"] = "plain",
                 kdim: int | None = None, bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.kind = num_heads, kind
        kdim = kdim or dim
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(kdim, dim, bias=bias)
        self.v_proj = nn.Linear(kdim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, mask_embed: Tensor | None = None,
                mask_feats: Tensor | None = None) -> Tensor:
        """query: (B, N, dim); key, value: (B, M, kdim), or (1, M, kdim) for ``agent``.

        For ``masked``: mask_embed (B, N, C) and mask_feats (B, C, M). Returns (B, N, dim).
        """
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        if self.kind == "agent":
            out = agent_attention(q, k, v)
        elif self.kind == "masked":
            if mask_embed is None or mask_feats is None:
                raise ValueError("masked attention needs mask_embed and mask_feats")
            out = masked_attention(q, k, v, mask_embed, mask_feats)
        else:
            out = attention(q, k, v)
        b, h, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))


def resize(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear resize with align_corners=False, no antialias (the reference code's default everywhere)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return nn.functional.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
