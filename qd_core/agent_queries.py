"""Hierarchical agent-query encoder (METHOD §3).

The paper: learnable queries aggregate hierarchical instance features from every backbone layer ("Hierarchical
Aggregating", weights shared across layers) into layer-wise queries, which two-plus "Progressive Merging"
stages reduce before "AverPool & Mapping" yields the agent queries.

Choices made here (METHOD §3.3):
- **A1, image-dependent layer-wise queries.** For layer l with Rein tokens T_l (m, D) and patch tokens F_l
  (B, N, D): Q_l = T_l + MHA(LN(T_l), LN(F_l), LN(F_l)), one attention module shared by all layers. The
  released code uses Q_l = T_l (image-independent); ``image_dependent: false`` reproduces that.
- **A2, per-slot merging.** The released StageGrouper flattens each layer's 100×1024 query set into one
  102 400-d vector (326 M parameters). Here every query slot is merged on its own: the L_in versions of slot j
  (one per layer group) are the keys/values, L_out learnable group tokens are the queries, so each stage maps
  (B·m, L_in, D) → (B·m, L_out, D) with the same semantics (learnable group tokens cross-attend over layer-level
  inputs, LayerNorm, projection back) at a tiny fraction of the size.
- The final head averages the remaining layer groups and maps them with LN → Linear(D, 4D) → GELU →
  Linear(4D, D), as the released FinalQueryHead does.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from qd_core.layers import Mlp, MultiheadAttention


class StageMerger(nn.Module):
    """One progressive-merging stage: (S, L_in, D) → (S, L_out, D), S = batch × query slots."""

    def __init__(self, num_out: int, dim: int, hidden: int, num_heads: int) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, hidden)
        self.group_tokens = nn.Parameter(torch.randn(num_out, hidden))
        self.attn = MultiheadAttention(hidden, num_heads, kind="plain")
        self.norm = nn.LayerNorm(hidden)
        self.proj_out = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: (S, L_in, D) → (S, L_out, D)."""
        h = self.proj_in(x)
        groups = self.group_tokens.unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.proj_out(self.norm(self.attn(groups, h, h)))


class AgentQueryEncoder(nn.Module):
    """Layer-wise queries → progressive merging → agent queries Q (B, m, D)."""

    def __init__(self, num_layers: int, dim: int, num_tokens: int, *, num_heads: int, merge_stages: list[int],
                 merge_dim: int, merge_heads: int, mlp_ratio: float, image_dependent: bool,
                 own_tokens: bool) -> None:
        super().__init__()
        self.num_layers, self.num_tokens, self.image_dependent = num_layers, num_tokens, image_dependent
        if own_tokens:
            # Without Reins the layer-wise queries start from learnable tokens of their own.
            self.layer_tokens = nn.Parameter(torch.empty(num_layers, num_tokens, dim))
            nn.init.trunc_normal_(self.layer_tokens, std=0.02)
        else:
            self.layer_tokens = None
        if image_dependent:
            self.norm_query = nn.LayerNorm(dim)
            self.norm_feat = nn.LayerNorm(dim)
            self.aggregate = MultiheadAttention(dim, num_heads, kind="plain")
        self.mergers = nn.ModuleList(StageMerger(n, dim, merge_dim, merge_heads) for n in merge_stages)
        self.final_norm = nn.LayerNorm(dim)
        self.final_mlp = Mlp(dim, int(dim * mlp_ratio), dim)

    def layer_queries(self, tokens: Tensor, layers: list[Tensor]) -> Tensor:
        """tokens: (L, m, D) per-layer tokens; layers: L × (B, N, D) patch tokens → (B, L, m, D)."""
        b = layers[0].shape[0]
        if not self.image_dependent:
            return tokens.unsqueeze(0).expand(b, -1, -1, -1)
        n_layers, m, d = tokens.shape
        # Every (layer, image) pair is an independent attention with the same weights, so all L·B of them run as
        # one batch: one norm and one attention call instead of L (at batch 1, L·~10 launches of little work).
        feats = self.norm_feat(torch.stack(layers)).flatten(0, 1)  # (L·B, N, D)
        t = tokens.unsqueeze(1).expand(n_layers, b, m, d).reshape(n_layers * b, m, d)
        queries = self.norm_query(tokens).unsqueeze(1).expand(n_layers, b, m, d).reshape(n_layers * b, m, d)
        out = t + self.aggregate(queries, feats, feats)  # (L·B, m, D)
        return out.view(n_layers, b, m, d).transpose(0, 1)

    def forward(self, layers: list[Tensor], tokens: Tensor | None = None) -> Tensor:
        """layers: L × (B, N, D) patch tokens after every block; tokens: (L, m, D) Rein tokens, or None to use
        the encoder's own. Returns agent queries (B, m, D)."""
        if tokens is None:
            if self.layer_tokens is None:
                raise ValueError("AgentQueryEncoder built for Rein tokens: pass tokens (L, m, D)")
            tokens = self.layer_tokens
        if len(layers) != self.num_layers or tokens.shape[0] != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layers of features and tokens, got {len(layers)} "
                             f"and {tokens.shape[0]}")
        q = self.layer_queries(tokens, layers)  # (B, L, m, D)
        b, n_layers, m, d = q.shape
        x = q.permute(0, 2, 1, 3).reshape(b * m, n_layers, d)  # one sequence of layer versions per slot
        for merger in self.mergers:
            x = merger(x)
        x = x.mean(dim=1).view(b, m, d)
        return self.final_mlp(self.final_norm(x))
