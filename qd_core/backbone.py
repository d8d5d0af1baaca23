"""Frozen DINOv2 vision transformer (METHOD §2.1) with a per-block adapter hook and the feature pyramid (§2.4).

Parameter names follow the official DINOv2 checkpoints (``cls_token``, ``pos_embed``, ``blocks.{i}.attn.qkv`` …)
so a converted ``dinov2_vit{s,b,l}14_pretrain.pth`` (see ``qd_core.checkpoint.convert_dinov2``) loads with
``strict=True`` and no renaming table. No register tokens, no drop-path, GELU MLP.

    backbone = DinoVisionTransformer(cfg.model.backbone)
    out = backbone(images, adapter=reins)      # reins(tokens, layer_index) after every block
    features = backbone.pyramid(out)           # 4 maps at strides 4/8/16/32
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qd_core.attention import attention
from qd_core.config import BackboneConfig, out_indices
from qd_core.layers import Mlp, map_layout, resize

# Adapter hook: (tokens (B, 1+N, D), block index) -> tokens (B, 1+N, D). LoRAReins.forward has this signature.
Adapter = Callable[[Tensor, int], Tensor]

# DINOv2 adds 0.1 to the target grid before turning it into a scale factor (historical guard against float
# round-down of the output size, facebookresearch/dino#8). Because the resampling then uses that scale factor for
# its source coordinates, the offset changes the values, so it must be kept to reproduce the pretrained features.
POS_INTERPOLATE_OFFSET = 0.1

# Stride-4/8/16/32 pyramid from stride-16 taps: plain bilinear resampling, no convolutions (METHOD §2.4).
PYRAMID_SCALES = (4.0, 2.0, 1.0, 0.5)


class BackboneOutput(NamedTuple):
    """What one backbone pass returns.

    layers: patch tokens (CLS dropped) after every block and its adapter, each (B, h*w, D).
    grid: the token grid (h, w) = (H / patch, W / patch).
    final: the last block's full token output after the final ``norm``, (B, 1+h*w, D).
    """

    layers: list[Tensor]
    grid: tuple[int, int]
    final: Tensor


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection; ``proj`` matches ``patch_embed.proj`` of the checkpoints."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        """images: (B, 3, H, W) → (B, D, H/patch, W/patch)."""
        return self.proj(images)


class LayerScale(nn.Module):
    """Per-channel residual-branch scale γ (CaiT); DINOv2 stores it as ``ls{1,2}.gamma``."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, N, D) → (B, N, D)."""
        return x * self.gamma

    def residual(self, x: Tensor, branch: Tensor) -> Tensor:
        """x + γ·branch as one operation (one kernel instead of two, twice per block)."""
        return torch.addcmul(x, branch, self.gamma)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (the checkpoints' layout: [q; k; v] rows)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, N, D) → (B, N, D)."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, d_head)
        out = attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale: x += γ1·Attn(LN(x)); x += γ2·MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, layerscale_init: float, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, num_heads)
        self.ls1 = LayerScale(dim, layerscale_init)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layerscale_init)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, N, D) → (B, N, D)."""
        x = self.ls1.residual(x, self.attn(self.norm1(x)))
        return self.ls2.residual(x, self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
    """Frozen DINOv2 ViT: patch embed + CLS + position embedding → ``depth`` blocks → final norm.

    All parameters have ``requires_grad=False`` and the module stays in eval mode whatever ``train()`` is
    asked; gradients still flow through it to the inputs and to an adapter's parameters.
    """

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        if cfg.pos_grid_size % cfg.patch_size:
            raise ValueError(f"pos_grid_size {cfg.pos_grid_size} is not a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        self.patch_size = cfg.patch_size
        self.embed_dim = cfg.embed_dim
        self.pos_grid = cfg.pos_grid_size // cfg.patch_size
        self.out_indices = out_indices(cfg)
        d = cfg.embed_dim

        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pos_grid * self.pos_grid, d))
        # Only used by DINOv2's masked-image pretraining; kept so official checkpoints load with strict=True.
        self.mask_token = nn.Parameter(torch.zeros(1, d))
        self.patch_embed = PatchEmbed(cfg.patch_size, d)
        self.blocks = nn.ModuleList(
            Block(d, cfg.num_heads, cfg.mlp_ratio, cfg.layerscale_init, cfg.layer_norm_eps) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self._init_weights()
        self.requires_grad_(False)
        self.train(False)

    def _init_weights(self) -> None:
        # DINOv2's own initialisation; only matters when no checkpoint is loaded (the tiny CPU config).
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def train(self, mode: bool = True) -> DinoVisionTransformer:
        """Ignores ``mode``: the backbone is frozen and always evaluates in eval mode (METHOD §2.1)."""
        return super().train(False)

    # ----------------------------------------------------------------------------------------------------------

    def _check_images(self, images: Tensor) -> tuple[int, int]:
        p = self.patch_size
        if not isinstance(images, Tensor):
            raise ValueError(f"images: expected a 4-D float tensor (B, 3, H, W), got {type(images).__name__}")
        if images.dim() != 4 or not images.is_floating_point():
            raise ValueError(f"images: expected a 4-D float tensor (B, 3, H, W), got {images.dtype} of shape "
                             f"{tuple(images.shape)}")
        _, c, h, w = images.shape
        if c != 3:
            raise ValueError(f"images: expected 3 channels (B, 3, H, W), got shape {tuple(images.shape)}")
        if h % p or w % p or h == 0 or w == 0:
            raise ValueError(f"images: expected H and W to be positive multiples of patch_size {p}, got shape "
                             f"{tuple(images.shape)}")
        return h // p, w // p

    def interpolate_pos_embed(self, h: int, w: int) -> Tensor:
        """Position embedding for an (h, w) token grid, (1, 1+h*w, D) in fp32.

        The stored (g, g) grid is used as is when (h, w) == (g, g); otherwise its patch part is resampled
        bicubically with DINOv2's recipe: scale factor ((h + 0.1) / g, (w + 0.1) / g), align_corners=False, no
        antialias, computed in fp32 (bicubic in half precision shifts the embedding).
        """
        g = self.pos_grid
        pos = self.pos_embed.float()
        if (h, w) == (g, g):
            return pos
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        d = patch_pos.shape[-1]
        grid = patch_pos.reshape(1, g, g, d).permute(0, 3, 1, 2)
        # float(): under torch.jit.trace / ONNX export the grid sizes arrive as 0-d tensors, which interpolate's
        # scale_factor does not accept; the traced graph is then specialised to this input size.
        scale = ((float(h) + POS_INTERPOLATE_OFFSET) / g, (float(w) + POS_INTERPOLATE_OFFSET) / g)
        # Output size is floor(g * (h + 0.1) / g) = h, so the offset never changes the grid, only the values.
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False, antialias=False)
        return torch.cat([cls_pos, grid.flatten(2).transpose(1, 2)], dim=1)

    def prepare_tokens(self, images: Tensor) -> Tensor:
        """Patch embedding, CLS token and position embedding.

        images: (B, 3, H, W) float, ImageNet-normalised; H and W multiples of patch_size.
        Returns tokens (B, 1 + h*w, D), CLS first, patches in row-major (h, w) order.
        """
        h, w = self._check_images(images)
        # A model converted to bf16/fp16 as a whole takes fp32 images too (a no-op for an fp32 model, and the cast
        # autocast would make anyway when only the weights are in low precision).
        x = self.patch_embed(images.to(self.patch_embed.proj.weight.dtype)).flatten(2).transpose(1, 2)  # (B, h*w, D)
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        return x + self.interpolate_pos_embed(h, w).to(x.dtype)

    def forward(self, images: Tensor, adapter: Adapter | None = None) -> BackboneOutput:
        """Run all blocks, applying ``adapter(tokens, block_index)`` after each one (LoRA-Reins, METHOD §2.3).

        images: (B, 3, H, W). Returns BackboneOutput with ``layers`` = patch tokens after every block and adapter,
        each (B, h*w, D); ``grid`` = (h, w); ``final`` = norm(last block output), (B, 1+h*w, D). The final norm is
        not applied to ``layers`` (the pyramid taps are un-normalised, as in the reference).
        """
        h, w = self._check_images(images)
        x = self.prepare_tokens(images)
        layers: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if adapter is not None:
                x = adapter(x, i)
            layers.append(x[:, 1:])
        return BackboneOutput(layers=layers, grid=(h, w), final=self.norm(x))

    def pyramid(self, out: BackboneOutput) -> list[Tensor]:
        """Four maps from the taps after blocks ``out_indices(cfg)`` (METHOD §2.4).

        out: a BackboneOutput of this backbone (layers each (B, h*w, D)). Returns
        [(B, D, 4h, 4w), (B, D, 2h, 2w), (B, D, h, w), (B, D, h/2, w/2)] at strides 4/8/16/32, each made by
        bilinear resampling (align_corners=False) with a scale factor, as the reference does.
        """
        if len(out.layers) != len(self.blocks):
            raise ValueError(f"out.layers: expected {len(self.blocks)} layers (one per block), got {len(out.layers)}")
        h, w = out.grid
        maps = []
        for index, scale in zip(self.out_indices, PYRAMID_SCALES):
            tokens = out.layers[index]
            b, n, d = tokens.shape
            if n != h * w:
                raise ValueError(f"out.layers[{index}]: expected {h * w} tokens for grid {out.grid}, got shape "
                                 f"{tuple(tokens.shape)}")
            # A view: the same layout, and so the same kernels downstream, at batch 1 as at batch 8.
            fmap = map_layout(tokens.transpose(1, 2).reshape(b, d, h, w))
            if scale != 1.0:
                fmap = resize(fmap, scale_factor=scale)
            maps.append(fmap)
        return maps
