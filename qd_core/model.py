"""The QueryDiff student: everything that runs at inference (DESIGN §3).

image (B, 3, H, W), ImageNet-normalised
  → frozen DINOv2 with LoRA-Reins after every block → patch tokens of every layer + 4-level pyramid
  → agent-query encoder → Q (B, m, D) → ``query_link`` → Q_h (B, m, d)
  → MSDeformAttn pixel decoder → refinement (pixel tokens attend to Q_h) → masked-attention decoder
  → class logits (B, m, K+1) and mask logits (B, m, H/4, W/4) for each of the decoder_layers + 1 outputs.

The diffusion teacher is not part of this module; training attaches it to ``StudentOutput.agent_queries``.
"""
from __future__ import annotations

import math

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels
from qd_core.agent_queries import AgentQueryEncoder
from qd_core.attention import backend_for
from qd_core.backbone import DinoVisionTransformer
from qd_core.config import Config, merge_stages
from qd_core.head.decoder import MaskedAttentionDecoder
from qd_core.head.pixel_decoder import MSDeformAttnPixelDecoder
from qd_core.head.refine import Refinement
from qd_core.inference import slide_inference, whole_inference
from qd_core.layers import class_argmax
from qd_core.reins import LoRAReins

# Pyramid level 3 is the token grid downsampled ×0.5, so the grid (H/16) must be even.
SIZE_MULTIPLE = 32


def input_size_multiple(cfg: Config) -> int:
    """What the student's input H and W must be multiples of (its forward pads to it): both 32 and twice the patch
    (the even token grid), e.g. 32 for patch 16 and 224 for DINOv2's own patch 14."""
    return math.lcm(SIZE_MULTIPLE, 2 * cfg.model.backbone.patch_size)


@dataclass
class StudentOutput:
    """The decoder outputs (prediction before layer 0 and after each layer; only the last with
    ``all_layers=False``) and the agent queries."""

    class_logits: list[Tensor]  # each (B, m, K+1)
    mask_logits: list[Tensor]  # each (B, m, H/4, W/4)
    agent_queries: Tensor  # (B, m, D), the input of the diffusion guidance losses


class QueryDiffStudent(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        m = cfg.model
        b, h = m.backbone, m.head
        self.num_classes = h.num_classes
        self.size_multiple = input_size_multiple(cfg)
        self.backbone = DinoVisionTransformer(b)
        self.reins = LoRAReins(b.depth, b.embed_dim, m.reins, patch_size=b.patch_size) if m.reins.enabled else None
        aq = m.agent_queries
        self.agent_queries = AgentQueryEncoder(
            b.depth, b.embed_dim, h.num_queries, num_heads=aq.num_heads, merge_stages=merge_stages(m),
            merge_dim=aq.merge_dim, merge_heads=aq.merge_heads, mlp_ratio=aq.mlp_ratio,
            image_dependent=aq.image_dependent, own_tokens=self.reins is None)
        # W_h (METHOD §3.4): agent queries live in the backbone width, the head in its own.
        self.query_link = nn.Linear(b.embed_dim, h.dim)
        self.pixel_decoder = MSDeformAttnPixelDecoder(b.embed_dim, h)
        self.refine = Refinement(h) if h.refine else None
        self.decoder = MaskedAttentionDecoder(h)
        self.register_buffer("pixel_mean", torch.tensor(m.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(m.pixel_std).view(1, 3, 1, 1), persistent=False)

    # ----------------------------------------------------------------------------------------------------------
    def check_images(self, images: Tensor, *, any_size: bool = False) -> None:
        if not isinstance(images, Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images: expected a (B, 3, H, W) tensor, got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"images: expected a float tensor (normalised RGB), got dtype {images.dtype}")
        if images.shape[1] != 3:
            raise ValueError(f"images: expected 3 channels (RGB), got shape {tuple(images.shape)}")
        k = self.size_multiple
        if not any_size and (images.shape[2] % k or images.shape[3] % k or images.shape[2] == 0):
            raise ValueError(f"images: height and width must be positive multiples of {k}, got "
                             f"{images.shape[2]}x{images.shape[3]} (predict() pads any size)")

    def normalize(self, images: Tensor) -> Tensor:
        """RGB in [0, 255] (B, 3, H, W) → ImageNet-normalised, the input every other method expects."""
        return (images.float() - self.pixel_mean) / self.pixel_std

    def forward(self, images: Tensor, *, all_layers: bool = True) -> StudentOutput:
        """images: (B, 3, H, W) normalised, H and W multiples of ``size_multiple`` (32 for patch 16) → all decoder
        outputs (training's deep supervision), or with ``all_layers=False`` the last one only (inference: the others
        are not computed)."""
        self.check_images(images)
        tokens = self.reins.all_tokens() if self.reins is not None else None  # (L, m, D), shared with the queries
        feats = self.backbone(images, adapter=self.reins.bind(tokens) if self.reins is not None else None)
        pyramid = self.backbone.pyramid(feats)
        queries = self.agent_queries(feats.layers, tokens)  # (B, m, D)
        head_queries = self.query_link(queries)  # (B, m, d)
        mask_features, memories = self.pixel_decoder(pyramid)
        if self.refine is not None:
            mask_features, memories = self.refine(mask_features, memories, head_queries)
        class_logits, mask_logits = self.decoder(mask_features, memories, head_queries, all_layers=all_layers)
        return StudentOutput(class_logits, mask_logits, queries)

    # ----------------------------------------------------------------------------------------------------------
    def combine(self, class_logits: Tensor, mask_logits: Tensor) -> Tensor:
        """(B, m, K+1), (B, m, h, w) → semantic logits (B, K, h, w) = Σ_q softmax(cls)[:K] · sigmoid(mask)."""
        probs = class_logits.softmax(dim=-1)[..., : self.num_classes]
        return torch.einsum("bqc,bqhw->bchw", probs, mask_logits.sigmoid())

    def full_size_labels(self, class_logits: Tensor, mask_logits: Tensor, size: tuple[int, int]) -> Tensor:
        """(B, m, K+1), (B, m, h, w) → labels (B, H, W) int32 of ``combine`` at ``size``, the mask logits resized
        before the sigmoid (as the reference head does at test time: it sharpens boundaries compared with resizing
        the stride-4 semantic logits). With the Triton kernels (``qd_core.attention.backend_for``) the resize,
        sigmoid, class product and argmax run as one kernel that writes only the labels; traced, exported and on
        CPU it is the PyTorch composition."""
        if backend_for(mask_logits) == "triton":
            probs = class_logits.softmax(dim=-1)[..., : self.num_classes]
            return kernels.semantic_labels(probs, mask_logits, size)
        full = F.interpolate(mask_logits, size=tuple(size), mode="bilinear", align_corners=False)
        return class_argmax(self.combine(class_logits, full)).to(torch.int32)

    def semantic_logits(self, images: Tensor) -> Tensor:
        """images: (B, 3, H, W) normalised → semantic logits (B, K, H/4, W/4) from the last decoder output."""
        out = self(images, all_layers=False)
        return self.combine(out.class_logits[-1], out.mask_logits[-1])

    def window_logits(self, images: Tensor) -> Tensor:
        """images: (B, 3, h, w) normalised → (B, K, h, w); mask logits are upsampled before the sigmoid, as the
        reference head does at test time."""
        out = self(images, all_layers=False)
        masks = F.interpolate(out.mask_logits[-1], size=images.shape[-2:], mode="bilinear", align_corners=False)
        return self.combine(out.class_logits[-1], masks)

    @torch.no_grad()
    def predict_logits(self, images: Tensor, mode: str | None = None) -> Tensor:
        """images: (B, 3, H, W) normalised, any size → semantic logits (B, K, H, W) (whole or slide inference)."""
        self.check_images(images, any_size=True)
        inf = self.cfg.inference
        mode = mode or inf.mode
        if mode == "whole":
            return whole_inference(self.window_logits, images, self.size_multiple)
        if mode == "slide":
            return slide_inference(self.window_logits, images, tuple(inf.window), tuple(inf.stride),
                                   self.num_classes, self.size_multiple, inf.window_batch)
        raise ValueError(f"inference mode {mode!r}: expected 'whole' or 'slide'")

    @torch.no_grad()
    def predict(self, images: Tensor, mode: str | None = None) -> Tensor:
        """images: (B, 3, H, W) normalised, any size → label map (B, H, W) int64."""
        return class_argmax(self.predict_logits(images, mode))


def build_student(cfg: Config) -> QueryDiffStudent:
    """The student described by ``cfg``; loads the DINOv2 weights when ``model.backbone.checkpoint`` is set."""
    model = QueryDiffStudent(cfg)
    if cfg.model.backbone.checkpoint:
        from qd_core.checkpoint import load_backbone_checkpoint

        load_backbone_checkpoint(model.backbone, cfg.model.backbone.checkpoint)
    return model
