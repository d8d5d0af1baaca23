"""Trainable half of the diffusion guidance (METHOD §4.4, §4.5): hyperfeature aggregation and the two losses.

    maps (9 × (B, C_k, h_k, w_k)) ──HyperfeatureAggregator──► tokens (B, M, D),  M = feature_size²
    Q (B, N, D), F_w, F_s (B, M, D) ──GuidanceLoss──► {"loss_dist": L_dist, "loss_sup": L_sup}

Nothing here knows about diffusers; the frozen teacher that produces the maps lives in ``qd_core.teacher``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NUM_HYPERFEATURE_MAPS = 9


def group_count(channels: int, max_groups: int = 32) -> int:
    """The largest divisor of ``channels`` that is at most ``max_groups`` (GN32 unless the width is small)."""
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


class BottleneckBlock(nn.Module):
    """ResNet bottleneck with a projection shortcut, GroupNorm everywhere (the Hyperfeatures aggregation block).

    1×1 in→b, GN, ReLU; 3×3 b→b, GN, ReLU; 1×1 b→out, GN; plus 1×1 in→out, GN; ReLU of the sum.
    """

    def __init__(self, in_channels: int, bottleneck_channels: int, out_channels: int) -> None:
        super().__init__()
        b = bottleneck_channels
        self.conv1 = nn.Conv2d(in_channels, b, 1, bias=False)
        self.norm1 = nn.GroupNorm(group_count(b), b)
        self.conv2 = nn.Conv2d(b, b, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(group_count(b), b)
        self.conv3 = nn.Conv2d(b, out_channels, 1, bias=False)
        self.norm3 = nn.GroupNorm(group_count(out_channels), out_channels)
        # The shortcut is normalised too, as in the detectron2 bottleneck that Hyperfeatures builds on, so both
        # branches enter the sum on the same scale whatever the UNet's activation magnitudes are.
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.shortcut_norm = nn.GroupNorm(group_count(out_channels), out_channels)
        for conv in (self.conv1, self.conv2, self.conv3, self.shortcut):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C_in, h, w) → (B, C_out, h, w)."""
        y = F.relu(self.norm1(self.conv1(x)))
        y = F.relu(self.norm2(self.conv2(y)))
        y = self.norm3(self.conv3(y))
        return F.relu(y + self.shortcut_norm(self.shortcut(x)))


class HyperfeatureAggregator(nn.Module):
    """Nine UNet maps → one token map in the backbone width (METHOD §4.4, after Diffusion Hyperfeatures).

    F = Σ_k softmax(w)_k · block_k(resize(h_k)), one bottleneck block per map and learnable mixing logits w.
    The same aggregator serves the weak and the strong noise level.
    """

    def __init__(self, channels: Sequence[int], out_dim: int, feature_size: int, bottleneck_dim: int) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) != NUM_HYPERFEATURE_MAPS or min(channels) <= 0:
            raise ValueError(f"channels: expected {NUM_HYPERFEATURE_MAPS} positive channel counts (one per UNet "
                             f"map), got {channels}")
        for name, value in (("out_dim", out_dim), ("feature_size", feature_size), ("bottleneck_dim", bottleneck_dim)):
            if int(value) <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {value}")
        self.channels = channels
        self.out_dim = int(out_dim)
        self.feature_size = int(feature_size)
        self.blocks = nn.ModuleList(BottleneckBlock(c, bottleneck_dim, out_dim) for c in channels)
        # Zero logits = equal weights at the start (Hyperfeatures initialises its mixing weights uniformly).
        self.mixing_logits = nn.Parameter(torch.zeros(len(channels)))

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        """maps: 9 tensors (B, C_k, h_k, w_k) → tokens (B, s², D) with s = feature_size, row-major positions."""
        if len(maps) != len(self.blocks):
            raise ValueError(f"maps: expected {len(self.blocks)} feature maps, got {len(maps)}")
        batch = maps[0].shape[0]
        for k, (m, c) in enumerate(zip(maps, self.channels)):
            if m.dim() != 4 or m.shape[1] != c or m.shape[0] != batch:
                raise ValueError(f"maps[{k}]: expected shape ({batch}, {c}, h, w), got {tuple(m.shape)}")
        size = (self.feature_size, self.feature_size)
        weights = self.mixing_logits.softmax(0)
        out: Tensor | None = None
        for k, (m, block) in enumerate(zip(maps, self.blocks)):
            if m.shape[-2:] != size:
                m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            y = weights[k] * block(m)
            out = y if out is None else out + y
        assert out is not None
        return out.flatten(2).transpose(1, 2)


class GuidanceLoss(nn.Module):
    """Distribution loss L_dist and supervision loss L_sup between agent queries and diffusion tokens (METHOD §4.5).

    S = softmax_M(W_q Q · (W_k F_w)ᵀ / √D); F̂ = MLP(Sᵀ · V(Q));
    L_dist = KL(softmax_c(sg F_s) ‖ softmax_c(F̂)) summed over positions and channels, divided by B;
    L_sup = SmoothL1_β=1(Q, sg(S · F_w)) averaged over B·N·D.
    Computed in fp32 even under autocast: the KL of two 1024-way softmaxes summed over 4096 positions loses
    too much in bf16.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if int(dim) <= 0:
            raise ValueError(f"dim: expected a positive integer, got {dim}")
        self.dim = int(dim)
        self.query_proj = nn.Linear(dim, dim)  # W_q
        self.key_proj = nn.Linear(dim, dim)  # W_k
        self.value_proj = nn.Linear(dim, dim)  # V
        self.out_mlp = nn.Linear(dim, dim)  # MLP

    def _check(self, queries: Tensor, weak: Tensor, strong: Tensor) -> None:
        d = self.dim
        if queries.dim() != 3 or queries.shape[-1] != d:
            raise ValueError(f"queries: expected shape (B, N, {d}), got {tuple(queries.shape)}")
        b = queries.shape[0]
        if weak.dim() != 3 or weak.shape[0] != b or weak.shape[-1] != d:
            raise ValueError(f"weak: expected shape ({b}, M, {d}), got {tuple(weak.shape)}")
        if strong.shape != weak.shape:
            raise ValueError(f"strong: expected the shape of weak {tuple(weak.shape)}, got {tuple(strong.shape)}")

    def similarity(self, queries: Tensor, weak: Tensor) -> Tensor:
        """queries (B, N, D), weak (B, M, D) → S (B, N, M), each query's distribution over diffusion positions."""
        logits = self.query_proj(queries) @ self.key_proj(weak).transpose(1, 2)
        return (logits / math.sqrt(self.dim)).softmax(dim=-1)

    def forward(self, queries: Tensor, weak: Tensor, strong: Tensor) -> dict[str, Tensor]:
        """queries Q (B, N, D), weak F_w (B, M, D), strong F_s (B, M, D) → {"loss_dist", "loss_sup"} scalars."""
        self._check(queries, weak, strong)
        with torch.autocast(device_type=queries.device.type, enabled=False):
            # The module's own precision: fp32 unless it was converted (.half(), .bfloat16()), the similarity S
            # and the reconstruction included; the KL's log-softmax and target softmax, the KL and the smooth-L1
            # are fp32 either way.
            dtype = self.value_proj.weight.dtype
            q, fw, fs = queries.to(dtype), weak.to(dtype), strong.to(dtype)
            s = self.similarity(q, fw)
            reconstruction = self.out_mlp(s.transpose(1, 2) @ self.value_proj(q))  # F̂ (B, M, D)
            b = q.shape[0]
            # Flattened to (B, M·D) so that "batchmean" divides the sum over positions and channels by B alone.
            log_p = F.log_softmax(reconstruction.float(), dim=-1).reshape(b, -1)
            target = F.softmax(fs.detach().float(), dim=-1).reshape(b, -1)
            loss_dist = F.kl_div(log_p, target, reduction="batchmean")
            # sg(S · F_w): METHOD §4.5 sends L_sup's gradient to Q only, so neither S nor F_w may carry it.
            pulled = (s @ fw).detach()
            loss_sup = F.smooth_l1_loss(q.float(), pulled.float(), beta=1.0)
        return {"loss_dist": loss_dist, "loss_sup": loss_sup}
