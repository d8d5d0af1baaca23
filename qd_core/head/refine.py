"""Refinement module between the pixel decoder and the masked-attention decoder (METHOD §5).

Every pixel token of the four head maps (mask features at stride 4 and the three memories at strides 32/16/8)
cross-attends to the projected agent queries; the four attention outputs are resized to stride 4, stacked and
re-fused by four dilated depthwise-separable convolutions, one per output scale.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

import kernels
from qd_core.attention import backend_for
from qd_core.config import HeadConfig
from qd_core.layers import MultiheadAttention, map_layout, resize

NUM_MEMORIES = 3


class DilatedSeparableFusion(nn.Module):
    """ReLU(BN(pointwise(depthwise 3×3, dilation ``dilation``))), both convolutions without bias (BN follows)."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int) -> None:
        super().__init__()
        # padding = dilation keeps the spatial size of a 3×3 kernel at any dilation.
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, padding=dilation, dilation=dilation,
                                   groups=in_channels, bias=False)
        self.dilation = dilation
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, in_channels, H, W) → (B, out_channels, H, W)."""
        return self.after_depthwise(self.depthwise(x))

    def after_depthwise(self, x: Tensor) -> Tensor:
        """The rest of the fusion on the depthwise output: (B, in_channels, H, W) → (B, out_channels, H, W)."""
        return self.act(self.norm(self.pointwise(x)))


class Refinement(nn.Module):
    """Pixel tokens attend to the agent queries; the results are fused across scales (METHOD §5).

    One attention module is shared by all four maps, as in the reference code. By default its output replaces
    the map (the reference code has no residual); ``cfg.refine_residual`` adds the map back instead.
    """

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.dim = d
        self.residual = cfg.refine_residual
        self.query_proj = nn.Linear(d, d)
        self.cross_attn = MultiheadAttention(d, cfg.num_heads, kind="agent")
        # G_j for j = 1..4: the dilation grows with the index, G_1 feeds stride 4, G_2..G_4 strides 32/16/8.
        self.fusions = nn.ModuleList(DilatedSeparableFusion((NUM_MEMORIES + 1) * d, d, dilation=j)
                                     for j in range(1, NUM_MEMORIES + 2))

    def _check(self, mask_features: Tensor, memories: Sequence[Tensor], queries: Tensor) -> None:
        if mask_features.dim() != 4 or mask_features.shape[1] != self.dim:
            raise ValueError(f"mask_features: expected (B, {self.dim}, H, W), got {tuple(mask_features.shape)}")
        b = mask_features.shape[0]
        if len(memories) != NUM_MEMORIES:
            raise ValueError(f"memories: expected {NUM_MEMORIES} maps (strides 32, 16, 8), got {len(memories)}")
        for i, m in enumerate(memories):
            if m.dim() != 4 or m.shape[0] != b or m.shape[1] != self.dim:
                raise ValueError(f"memories[{i}]: expected ({b}, {self.dim}, h, w), got {tuple(m.shape)}")
        if queries.dim() != 3 or queries.shape[0] != b or queries.shape[2] != self.dim:
            raise ValueError(f"queries: expected ({b}, Nq, {self.dim}), got {tuple(queries.shape)}")

    def forward(self, mask_features: Tensor, memories: Sequence[Tensor], queries: Tensor
                ) -> tuple[Tensor, list[Tensor]]:
        """Refine the head maps with the agent queries.

        Args:
            mask_features: (B, d, H/4, W/4) pixel-decoder mask features M0.
            memories: [M1 (B, d, H/32, W/32), M2 (B, d, H/16, W/16), M3 (B, d, H/8, W/8)].
            queries: (B, Nq, d) projected agent queries Q_h.
        Returns:
            (mask_features' (B, d, H/4, W/4), [M1', M2', M3'] with the shapes of the inputs).
        """
        self._check(mask_features, memories, queries)
        keys = self.query_proj(queries)
        maps = [mask_features, *memories]
        out_size = mask_features.shape[-2:]
        # The four maps attend to the same keys with the same weights, and every step is per token, so they go
        # through as one sequence: one attention call (and one of each projection) instead of four.
        tokens = torch.cat([m.flatten(2) for m in maps], dim=2).transpose(1, 2)  # (B, Σ h·w, d)
        sizes = [m.shape[-2] * m.shape[-1] for m in maps]
        responses = self.cross_attn(tokens, keys, keys).transpose(1, 2).split(sizes, dim=2)
        attended = []
        for m, r in zip(maps, responses):
            # A view (see channels_last): the concatenation and the fusions' convolutions then run channels-last
            # at batch 1 too, as PyTorch picks by itself at larger batches.
            r = map_layout(r.reshape(m.shape))
            attended.append(resize(m + r if self.residual else r, out_size))
        fused_input = map_layout(torch.cat(attended, dim=1))  # (B, 4d, H/4, W/4), order [M0, M1, M2, M3]
        fused = [f.after_depthwise(y) for f, y in zip(self.fusions, self._depthwise(fused_input))]
        new_memories = [resize(g, m.shape[-2:]) for g, m in zip(fused[1:], memories)]
        return fused[0], new_memories

    def _depthwise(self, x: Tensor) -> list[Tensor]:
        """The fusions' depthwise convolutions of their shared input x (B, 4d, H/4, W/4), one output per fusion.

        Where the Triton kernels run (``qd_core.attention.backend_for``) and no gradient is wanted, one kernel
        computes all four from a single pass over x (``kernels.depthwise_conv3x3``); otherwise four convolutions.
        """
        weights = [f.depthwise.weight for f in self.fusions]
        if backend_for(x) == "triton" and not (torch.is_grad_enabled()
                                               and (x.requires_grad or any(w.requires_grad for w in weights))):
            if torch.is_autocast_enabled(x.device.type):
                x = x.to(torch.get_autocast_dtype(x.device.type))  # as autocast would run the convolutions
            return kernels.depthwise_conv3x3(x, weights, [f.dilation for f in self.fusions])
        return [f.depthwise(x) for f in self.fusions]
