"""Mask2Former masked-attention transformer decoder with QueryDiff's agent queries (METHOD §6.2, §3.4).

The queries are not learned embeddings as in Mask2Former: their content is ``querys2feat(Q_h)`` and their
positional embedding is Q_h itself. Each layer attends, through the mask predicted by the previous prediction,
to one memory level (strides 32, 16, 8 repeating), then to the other queries, then runs an FFN.

The attention mask is passed to ``qd_core.attention.masked_attention`` as its two factors, the mask embeddings
(B, Nq, d) and the mask features resized once per forward to each memory level (B, d, h·w), instead of a
materialised (B·heads, Nq, h·w) boolean tensor. Bilinear resizing is linear, so
``embed · resize(F) == resize(embed · F)``: the factorised mask is Mask2Former's mask (resize the predicted
logits to the memory size, block where sigmoid < 0.5) up to rounding of logits at 0.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from qd_core.config import HeadConfig
from qd_core.head.position import sine_position_encoding
from qd_core.layers import Mlp, MultiheadAttention, map_layout, resize

NUM_LEVELS = 3


def resized_mask_features(mask_features: Tensor, sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
    """The mask features as mask factors for each memory size, detached (Mask2Former detaches the mask).

    Args:
        mask_features: (B, d, H, W).
        sizes: memory sizes (h, w), one per level.
    Returns:
        one (B, d, h·w) tensor per size.
    """
    detached = map_layout(mask_features.detach())  # one layout change for the three resizes, not one each
    return [resize(detached, size).flatten(2) for size in sizes]


class MaskedDecoderLayer(nn.Module):
    """Post-norm Mask2Former layer: masked cross-attention → self-attention → FFN, each + residual + LayerNorm."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.cross_attn = MultiheadAttention(dim, num_heads, kind="masked")
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = MultiheadAttention(dim, num_heads, kind="plain")
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = Mlp(dim, ffn_dim, act=nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, query: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Tensor, mask_embed: Tensor,
                mask_feats: Tensor, memory_key: Tensor | None = None) -> Tensor:
        """One decoder layer.

        Args:
            query: (B, Nq, d) query content.
            query_pos: (B, Nq, d) query positional embedding, added to the queries of both attentions.
            memory: (B, L, d) flattened memory level (with its level embedding); the cross-attention values.
            memory_pos: (B, L, d) or (1, L, d) sine encoding added to the memory to form the keys.
            mask_embed: (B, Nq, d) mask embeddings of the previous prediction.
            mask_feats: (B, d, L) mask features resized to this memory level.
            memory_key: memory + memory_pos when already computed (the decoder makes it once per level).
        Returns:
            (B, Nq, d) updated query content.
        """
        key = memory + memory_pos if memory_key is None else memory_key
        attended = self.cross_attn(query + query_pos, key, memory, mask_embed, mask_feats)
        query = self.norm1(query + attended)
        q = query + query_pos
        query = self.norm2(query + self.self_attn(q, q, query))
        return self.norm3(query + self.ffn(query))


class MaskedAttentionDecoder(nn.Module):
    """Stack of ``cfg.decoder_layers`` masked-attention layers with a prediction head before and after each."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.dim = d
        self.num_classes = cfg.num_classes
        self.querys2feat = nn.Linear(d, d)
        self.level_embed = nn.Embedding(NUM_LEVELS, d)
        self.layers = nn.ModuleList(MaskedDecoderLayer(d, cfg.num_heads, cfg.decoder_ffn)
                                    for _ in range(cfg.decoder_layers))
        self.decoder_norm = nn.LayerNorm(d)
        self.cls_embed = nn.Linear(d, cfg.num_classes + 1)  # + "no object"
        self.mask_embed = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        # mmdet's Mask2FormerHead re-initialises only the transformer-decoder stack; the prediction head, level
        # embedding and query projection keep PyTorch's defaults.
        for p in self.layers.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)

    def predict(self, query: Tensor, mask_features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Prediction head.

        Args:
            query: (B, Nq, d) query content.
            mask_features: (B, d, H, W).
        Returns:
            class logits (B, Nq, num_classes + 1), mask logits (B, Nq, H, W), mask embeddings (B, Nq, d).
        """
        x = self.decoder_norm(query)
        embed = self.mask_embed(x)
        masks = torch.einsum("bqc,bchw->bqhw", embed, mask_features)
        return self.cls_embed(x), masks, embed

    def _check(self, mask_features: Tensor, memories: Sequence[Tensor], query_pos: Tensor) -> None:
        if mask_features.dim() != 4 or mask_features.shape[1] != self.dim:
            raise ValueError(f"mask_features: expected (B, {self.dim}, H, W), got {tuple(mask_features.shape)}")
        b = mask_features.shape[0]
        if len(memories) != NUM_LEVELS:
            raise ValueError(f"memories: expected {NUM_LEVELS} maps (strides 32, 16, 8), got {len(memories)}")
        for i, m in enumerate(memories):
            if m.dim() != 4 or m.shape[0] != b or m.shape[1] != self.dim:
                raise ValueError(f"memories[{i}]: expected ({b}, {self.dim}, h, w), got {tuple(m.shape)}")
        if query_pos.dim() != 3 or query_pos.shape[0] != b or query_pos.shape[2] != self.dim:
            raise ValueError(f"query_pos: expected ({b}, Nq, {self.dim}), got {tuple(query_pos.shape)}")

    def forward(self, mask_features: Tensor, memories: Sequence[Tensor], query_pos: Tensor, *,
                all_layers: bool = True) -> tuple[list[Tensor], list[Tensor]]:
        """Decode the queries into class and mask predictions.

        Args:
            mask_features: (B, d, H/4, W/4) refined mask features.
            memories: [(B, d, H/32, W/32), (B, d, H/16, W/16), (B, d, H/8, W/8)] refined memories.
            query_pos: (B, Nq, d) projected agent queries Q_h (the queries' positional embedding).
            all_layers: False for inference, which reads the last prediction only: the others' class logits and
                full-size mask products (B, Nq, H/4, W/4 each, the layer's largest output) are skipped; each
                layer still makes the mask embeddings the next one's attention mask comes from.
        Returns:
            class_logits: ``decoder_layers + 1`` tensors (B, Nq, num_classes + 1), the first before layer 0
                (only the last one without ``all_layers``);
            mask_logits: ``decoder_layers + 1`` tensors (B, Nq, H/4, W/4), likewise.
        """
        self._check(mask_features, memories, query_pos)
        levels = []
        for i, m in enumerate(memories):
            _, c, h, w = m.shape
            # Contiguous tokens: a Linear on the transposed view would run as bmm + a separate bias add, in the
            # k and v projections of every third layer; one copy per level saves two kernels per layer.
            memory = m.flatten(2).transpose(1, 2).contiguous() + self.level_embed.weight[i]
            # Batch 1, broadcast in the sum: the encoding does not depend on the image.
            pos = sine_position_encoding(1, h, w, c // 2, device=m.device, dtype=m.dtype)
            pos = pos.flatten(2).transpose(1, 2)
            # Each level serves every third layer: its keys (memory + position) are made once.
            levels.append((memory, pos, memory + pos))
        mask_factors = resized_mask_features(mask_features, [m.shape[-2:] for m in memories])

        query = self.querys2feat(query_pos)
        class_logits: list[Tensor] = []
        mask_logits: list[Tensor] = []
        # len(), not truthiness: Dynamo of torch 2.11 cannot trace `not ModuleList` and breaks the graph here.
        embed = self._outputs(query, mask_features, all_layers or len(self.layers) == 0, class_logits, mask_logits)
        for i, layer in enumerate(self.layers):
            level = i % NUM_LEVELS
            memory, pos, key = levels[level]
            query = layer(query, query_pos, memory, pos, embed.detach(), mask_factors[level], memory_key=key)
            embed = self._outputs(query, mask_features, all_layers or i == len(self.layers) - 1, class_logits,
                                  mask_logits)
        return class_logits, mask_logits

    def _outputs(self, query: Tensor, mask_features: Tensor, predict: bool, class_logits: list[Tensor],
                 mask_logits: list[Tensor]) -> Tensor:
        """The mask embeddings (B, Nq, d) of ``query``; with ``predict`` also its class and mask logits, appended to
        the lists."""
        if not predict:
            return self.mask_embed(self.decoder_norm(query))
        cls, masks, embed = self.predict(query, mask_features)
        class_logits.append(cls)
        mask_logits.append(masks)
        return embed
