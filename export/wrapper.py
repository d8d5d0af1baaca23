"""The export wrapper: the exact graph that goes to ONNX / TensorRT, kept beside the model, not inside it.

The wrapper folds pre- and post-processing into the graph so a deployment needs nothing but the engine:

    images (B, 3, H, W) float RGB in [0, 255]
      → ImageNet normalisation                                   (model.normalize)
      → student forward, last decoder output                     (class (B, Nq, K+1), masks (B, Nq, H/4, W/4))
      → logits (B, K, H/4, W/4) float32: Σ_q softmax(cls)[:K] · sigmoid(mask)      (model.semantic_logits)
      → labels (B, H, W) int32: argmax over K of the same sum with the mask logits upsampled to H×W before the
        sigmoid                                                   (model.full_size_labels)

``labels`` is int32 rather than ArgMax's native int64: TensorRT computes ArgMax as TopK, whose indices are int32,
and 19 classes fit any integer type. The batch axis is dynamic; H and W are fixed at export time.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "labels")
LABEL_DTYPE = torch.int32


class ExportWrapper(nn.Module):
    """A QueryDiff student as one image-in, (logits, labels)-out module.

    Args:
        model: a ``qd_core.model.QueryDiffStudent`` (or any module with ``normalize``, ``combine``,
            ``full_size_labels`` and a ``forward(images, all_layers=False)`` returning ``class_logits`` /
            ``mask_logits`` lists, the last entry being the prediction).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_classes = int(model.num_classes)
        self.size_multiple = int(getattr(model, "size_multiple", 32))

    def check_images(self, images: Tensor) -> None:
        """Raise ValueError unless ``images`` is a float (B, 3, H, W) tensor with H, W multiples of the model's."""
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images: expected a (B, 3, H, W) RGB tensor, got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"images: expected float RGB values in [0, 255], got dtype {images.dtype}")
        k = self.size_multiple
        h, w = images.shape[-2:]
        if h == 0 or w == 0 or h % k or w % k:
            raise ValueError(f"images: height and width must be positive multiples of {k}, got {h}x{w}")

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images: (B, 3, H, W) float RGB in [0, 255] → logits (B, K, H/4, W/4) float32, labels (B, H, W) int32."""
        if not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
            self.check_images(images)
        out = self.model(self.model.normalize(images), all_layers=False)  # the last decoder output only
        class_logits, mask_logits = out.class_logits[-1], out.mask_logits[-1]
        logits = self.model.combine(class_logits, mask_logits)
        labels = self.model.full_size_labels(class_logits, mask_logits, images.shape[-2:]).to(LABEL_DTYPE)
        return logits.float(), labels
