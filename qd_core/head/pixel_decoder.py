"""Mask2Former's MSDeformAttn pixel decoder (METHOD §6.1).

Strides 8/16/32 go through a stack of deformable-attention encoder layers (processed coarse to fine, [32, 16,
8]); the stride-4 map joins through one FPN step; a 1×1 conv gives the mask features.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import Tensor, nn

from qd_core.config import HeadConfig
from qd_core.constants import cached_constant, device_constant
from qd_core.head.msda import SAMPLING_MODES, MSDeformAttn
from qd_core.head.position import sine_position_encoding
from qd_core.layers import Mlp, resize

NUM_LEVELS = 3  # encoder levels: strides 32, 16, 8


class ConvNorm(nn.Sequential):
    """Conv2d → GroupNorm(32) → optional ReLU. The conv has no bias unless asked (the GroupNorm has its own, which
    absorbs a bias shared by a group, not one per channel)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, relu: bool = False,
                 bias: bool = False) -> None:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        if bias:
            # Zeros, added after construction: a bias drawn by Conv2d would consume the random stream and change
            # the initial weights of every module built after this one (the pixel decoder resets it to 0 anyway).
            conv.bias = nn.Parameter(torch.zeros(out_channels))
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv=conv,
            norm=nn.GroupNorm(32, out_channels),
        )
        if relu:
            layers["act"] = nn.ReLU()
        super().__init__(layers)


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: x ← LN(x + MSDeformAttn(x + pos, x)); x ← LN(x + FFN(x)). Dropout 0."""

    def __init__(self, dim: int, num_heads: int, num_points: int, ffn_dim: int) -> None:
        super().__init__()
        self.attn = MSDeformAttn(dim, num_heads, NUM_LEVELS, num_points)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = Mlp(dim, ffn_dim, act=nn.ReLU)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Sequence[tuple[int, int]],
                level_start_index: Tensor) -> Tensor:
        """x, pos: (B, S, C); reference_points: (B, S, L, 2) normalised (x, y). Returns (B, S, C)."""
        x = self.norm1(x + self.attn(x + pos, reference_points, x, spatial_shapes, level_start_index))
        return self.norm2(x + self.ffn(x))


class DeformableEncoder(nn.Module):
    """A stack of ``DeformableEncoderLayer`` over the flattened tokens of all encoder levels."""

    def __init__(self, dim: int, num_heads: int, num_points: int, ffn_dim: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(dim, num_heads, num_points, ffn_dim)
                                    for _ in range(num_layers))

    @staticmethod
    def reference_points(spatial_shapes: Sequence[tuple[int, int]], device: torch.device,
                         dtype: torch.dtype) -> Tensor:
        """(S, 2) normalised (x, y) pixel centres ((j + 0.5)/w, (i + 0.5)/h) of every level, concatenated.

        All images are unpadded (valid ratio 1), so a token's reference point is the same on every level. Made
        once per sizes, device and dtype (``qd_core.constants``): read it, do not write into it.
        """
        shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
        return cached_constant(("reference_points", shapes, torch.device(device), dtype),
                               lambda: DeformableEncoder._reference_points(shapes, device, dtype))

    @staticmethod
    def _reference_points(spatial_shapes: Sequence[tuple[int, int]], device: torch.device,
                          dtype: torch.dtype) -> Tensor:
        points = []
        for h, w in spatial_shapes:
            ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
            xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
            grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
            points.append(torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=-1))
        return torch.cat(points, dim=0)

    def forward(self, x: Tensor, pos: Tensor, spatial_shapes: Sequence[tuple[int, int]],
                level_start_index: Tensor) -> Tensor:
        """x, pos: (B, S, C) flattened levels in ``spatial_shapes`` order. Returns (B, S, C)."""
        # fp32 even for a bf16/fp16 model: in half precision a normalised point is off by up to ~1/256 of the map.
        ref = self.reference_points(spatial_shapes, x.device, torch.float32)  # (S, 2)
        ref = ref[None, :, None, :].expand(x.shape[0], -1, len(spatial_shapes), -1)  # (B, S, L, 2)
        for layer in self.layers:
            x = layer(x, pos, ref, spatial_shapes, level_start_index)
        return x


class MSDeformAttnPixelDecoder(nn.Module):
    """Pyramid (strides 4/8/16/32, width D) → mask features (stride 4) and 3 encoder memories (width cfg.dim)."""

    def __init__(self, in_channels: int, cfg: HeadConfig) -> None:
        super().__init__()
        dim = cfg.dim
        if in_channels <= 0:
            raise ValueError(f"in_channels={in_channels}: expected a positive integer (backbone width)")
        if dim % 32:
            raise ValueError(f"cfg.dim={dim}: expected a multiple of 32 (GroupNorm(32) in the pixel decoder)")
        if dim % cfg.num_heads:
            raise ValueError(f"cfg.num_heads={cfg.num_heads}: expected a divisor of cfg.dim={dim}")
        self.in_channels, self.dim = in_channels, dim
        # input_convs[i] projects the encoder level of stride (32, 16, 8)[i].
        # With a bias, as mmdet's MSDeformAttnPixelDecoder builds them (its lateral and output convs have none).
        self.input_convs = nn.ModuleList(ConvNorm(in_channels, dim, 1, bias=True) for _ in range(NUM_LEVELS))
        self.level_embed = nn.Parameter(torch.empty(NUM_LEVELS, dim))
        self.encoder = DeformableEncoder(dim, cfg.num_heads, cfg.msda_points, cfg.pixel_decoder_ffn,
                                         cfg.pixel_decoder_layers)
        self.lateral_conv = ConvNorm(in_channels, dim, 1)
        self.output_conv = ConvNorm(dim, dim, 3, relu=True)
        self.mask_feature = nn.Conv2d(dim, dim, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmdet's init: xavier on the input projections and encoder matrices, caffe2-xavier on the FPN convs."""
        for conv_norm in self.input_convs:
            nn.init.xavier_uniform_(conv_norm.conv.weight)
            nn.init.zeros_(conv_norm.conv.bias)
        for p in self.encoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        # The blanket xavier above must not overwrite the deformable attention's own (zero-offset) init.
        for m in self.encoder.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        # caffe2's "xavier fill" is a uniform kaiming init with a = 1.
        for conv in (self.lateral_conv.conv, self.output_conv.conv, self.mask_feature):
            nn.init.kaiming_uniform_(conv.weight, a=1)
        nn.init.zeros_(self.mask_feature.bias)
        nn.init.normal_(self.level_embed)

    def set_msda_sampling(self, mode: str) -> None:
        """Pick the sampling core of every MSDeformAttn layer: ``"grid_sample"`` (on CUDA it runs the Triton kernel
        where the kernels are used), ``"gather"`` (export) or ``"triton"``."""
        if mode not in SAMPLING_MODES:
            raise ValueError(f"mode={mode!r}: expected one of {SAMPLING_MODES}")
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.sampling = mode

    def forward(self, feats: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Run the deformable encoder and the stride-4 FPN step.

        Args:
            feats: 4 maps [(B, D, H/4, W/4), (B, D, H/8, W/8), (B, D, H/16, W/16), (B, D, H/32, W/32)].
        Returns:
            mask_features (B, dim, H/4, W/4) and memories [(B, dim, H/32, W/32), (B, dim, H/16, W/16),
            (B, dim, H/8, W/8)] (coarse to fine: the order the transformer decoder cycles through).
        """
        if len(feats) != 4:
            raise ValueError(f"feats: expected 4 maps at strides 4/8/16/32, got {len(feats)}")
        for i, f in enumerate(feats):
            if f.dim() != 4 or f.shape[1] != self.in_channels:
                raise ValueError(f"feats[{i}]: expected (B, {self.in_channels}, h, w), got shape {tuple(f.shape)}")
        b = feats[0].shape[0]
        encoder_inputs = [feats[3], feats[2], feats[1]]  # strides 32, 16, 8

        tokens, positions, spatial_shapes = [], [], []
        for lvl, (f, proj) in enumerate(zip(encoder_inputs, self.input_convs)):
            x = proj(f)
            h, w = x.shape[-2:]
            pos = sine_position_encoding(b, h, w, self.dim // 2, device=x.device, dtype=x.dtype)
            tokens.append(x.flatten(2).transpose(1, 2))
            positions.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
            spatial_shapes.append((h, w))
        level_sizes = [h * w for h, w in spatial_shapes]
        starts = [sum(level_sizes[:i]) for i in range(NUM_LEVELS)]
        level_start_index = device_constant(tuple(starts), torch.long, feats[0].device)

        memory = self.encoder(torch.cat(tokens, 1), torch.cat(positions, 1), spatial_shapes, level_start_index)
        memories = [m.transpose(1, 2).reshape(-1, self.dim, h, w)
                    for m, (h, w) in zip(memory.split(level_sizes, dim=1), spatial_shapes)]

        # FPN step: stride 4 = lateral(stride-4 input) + upsampled stride-8 encoder output.
        y = self.lateral_conv(feats[0]) + resize(memories[-1], feats[0].shape[-2:])
        mask_features = self.mask_feature(self.output_conv(y))
        return mask_features, memories
