"""Parity of every exported artifact against the PyTorch fp32 reference on real images, and ``report.json``.

Evaluation images: the embedded synthetic scenes by default (source-domain val plus every target domain's val,
generated once by ``qd_core.data.ensure_synthetic``), or a folder given with ``--data``: a synthetic-data root
(with ``manifest.json``) or a Cityscapes-layout root (``leftImg8bit/val`` + ``gtFine/val``). Each image is
resized (bilinear; labels nearest) so it covers the export size and centre-cropped to it, because exported
graphs take exactly H×W.

For each artifact, against the reference on the same batches:
  * ``max_abs_logit_error``: max |logits − reference logits| over all images, classes and stride-4 pixels;
  * ``argmax_agreement``: fraction of full-size pixels whose label equals the reference label;
  * ``miou`` (percent) of the artifact's labels against the ground truth, and ``miou_delta`` = artifact − reference
    in points.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from export.runtime import Segmenter

REPORT_FORMAT = "querydiff-export-report"
IGNORE_INDEX = 255


@dataclass
class EvalSample:
    """One evaluation image at the export size."""

    image: Tensor  # (3, H, W) float32 RGB in [0, 255]
    label: Tensor  # (H, W) int64 train ids, 255 = ignore
    domain: str
    path: str


def fit_and_crop(image: np.ndarray, label: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize (keeping the aspect ratio) so the image covers height×width, then centre-crop to it.

    image (h, w, 3) uint8, label (h, w) → image (height, width, 3), label (height, width).
    """
    from qd_core.data.transforms import resize_image, resize_label

    h, w = label.shape
    scale = max(height / h, width / w)
    size = (max(height, int(round(h * scale))), max(width, int(round(w * scale))))
    image, label = resize_image(image, size), resize_label(label, size)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return image[top:top + height, left:left + width], label[top:top + height, left:left + width]


def _cityscapes_pairs(root: Path) -> list[tuple[Path, Path]]:
    from qd_core.data.datasets import cityscapes_samples

    return [(s.image, s.label) for s in cityscapes_samples(root, "val") if s.label is not None]


def evaluation_sources(data: Path) -> dict[str, list[tuple[Path, Path]]]:
    """(image, label) file pairs per domain of a synthetic-data root or a Cityscapes-layout root."""
    from qd_core.data.synthetic import read_manifest

    data = Path(data)
    if not data.is_dir():
        raise ValueError(f"--data '{data}': folder not found")
    manifest = read_manifest(data)
    if manifest is not None:
        domains = [manifest.get("source_domain", "source"), *manifest.get("target_domains", [])]
        return {d: _cityscapes_pairs(data / d) for d in domains}
    if (data / "leftImg8bit" / "val").is_dir():
        return {data.name: _cityscapes_pairs(data)}
    raise ValueError(f"--data '{data}': expected a synthetic-data folder (with manifest.json) or a Cityscapes-layout "
                     f"folder (leftImg8bit/val and gtFine/val)")


def load_evaluation_set(data: Path, *, height: int, width: int, max_per_domain: int = 0) -> list[EvalSample]:
    """Every domain's val images of ``data`` (at most ``max_per_domain`` each, 0 = all) at height×width."""
    from qd_core.data.files import read_image, read_label
    from qd_core.data.labels import check_train_ids

    samples: list[EvalSample] = []
    for domain, pairs in evaluation_sources(data).items():
        if max_per_domain:
            pairs = pairs[:max_per_domain]
        for image_path, label_path in pairs:
            image, label = read_image(image_path), read_label(label_path)
            if label.shape != image.shape[:2]:
                raise ValueError(f"{label_path}: label size {label.shape} differs from image {image_path} "
                                 f"{image.shape[:2]}")
            check_train_ids(label, label_path)
            image, label = fit_and_crop(image, label.astype(np.int64), height, width)
            samples.append(EvalSample(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float(),
                                      torch.from_numpy(np.ascontiguousarray(label)).long(), domain,
                                      str(image_path)))
    if not samples:
        raise ValueError(f"--data '{data}': no evaluation images found")
    return samples


def _batches(samples: Sequence[EvalSample], size: int) -> Iterable[list[EvalSample]]:
    for i in range(0, len(samples), size):
        yield list(samples[i:i + size])


def evaluate_parity(reference: Segmenter, artifacts: dict[str, Segmenter], samples: Sequence[EvalSample], *,
                    batch_size: int = 1, num_classes: int = 19,
                    progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run the reference and every artifact on ``samples``; return the parity numbers.

    Returns {"reference": {"miou", "per_domain"}, "artifacts": {name: {"max_abs_logit_error", "logit_rel_error"
    (‖L − L_ref‖ / ‖L_ref‖ over all images), "argmax_agreement", "miou", "miou_delta", "per_domain", "seconds"}},
    "images": N}.
    """
    from qd_core.metrics import ConfusionMatrix

    domains = sorted({s.domain for s in samples})
    names = ["reference", *artifacts]
    matrices = {n: {d: ConfusionMatrix(num_classes, IGNORE_INDEX) for d in domains} for n in names}
    max_err = {n: 0.0 for n in artifacts}
    # Σ (L − L_ref)² and Σ L_ref² in float64, for the relative error export.parity judges.
    sq_err = {n: 0.0 for n in artifacts}
    sq_ref = 0.0
    agree = {n: 0 for n in artifacts}
    seconds = {n: 0.0 for n in names}
    pixels = 0
    done = 0
    first = next(iter(_batches(samples, batch_size)), None)
    if first is not None:
        # One untimed call each: first-call work (allocator growth, ONNX Runtime's and cuDNN's plans, lazy loading)
        # is not a backend's running time.
        warm = torch.stack([s.image for s in first])
        for seg in (reference, *artifacts.values()):
            seg.run(warm)
    for batch in _batches(samples, batch_size):
        images = torch.stack([s.image for s in batch])
        labels = torch.stack([s.label for s in batch])
        # Timed until the results are on the host: a CUDA backend's run only enqueues its work, and .cpu() waits
        # for it (ONNX Runtime's are there already).
        start = time.perf_counter()
        ref_logits, ref_labels = reference.run(images)
        ref_logits, ref_labels = ref_logits.float().cpu(), ref_labels.cpu()
        seconds["reference"] += time.perf_counter() - start
        for i, s in enumerate(batch):
            matrices["reference"][s.domain].update(ref_labels[i], labels[i])
        pixels += ref_labels.numel()
        sq_ref += float(ref_logits.double().square().sum())
        for name, seg in artifacts.items():
            start = time.perf_counter()
            logits, pred = seg.run(images)
            logits, pred = logits.float().cpu(), pred.cpu()
            seconds[name] += time.perf_counter() - start
            # NaN-aware: Python's max() drops a NaN (nan > x is False), and NaN logits are how a broken fp16 graph
            # fails; they must show as an infinite error, not as 0.
            err = float((logits - ref_logits).abs().nan_to_num(nan=math.inf).max())
            max_err[name] = max(max_err[name], err)
            sq_err[name] += float((logits.double() - ref_logits.double()).square().sum())
            agree[name] += int((pred.long() == ref_labels.long()).sum())
            for i, s in enumerate(batch):
                matrices[name][s.domain].update(pred[i].long(), labels[i])
        done += len(batch)
        if progress is not None:
            progress(done, len(samples))

    def summary(name: str) -> dict[str, Any]:
        total = ConfusionMatrix(num_classes, IGNORE_INDEX)
        for m in matrices[name].values():
            total.merge(m)
        return {"miou": 100.0 * total.miou(),
                "per_domain": {d: 100.0 * m.miou() for d, m in matrices[name].items()},
                "seconds": seconds[name]}

    reference_summary = summary("reference")
    results: dict[str, Any] = {}
    for name in artifacts:
        s = summary(name)
        rel = math.sqrt(sq_err[name] / sq_ref) if sq_ref > 0 else (0.0 if sq_err[name] == 0 else math.inf)
        results[name] = {
            "max_abs_logit_error": max_err[name],
            "logit_rel_error": math.inf if math.isnan(rel) else rel,
            "argmax_agreement": agree[name] / max(pixels, 1),
            "miou": s["miou"],
            "miou_delta": s["miou"] - reference_summary["miou"],
            "per_domain": s["per_domain"],
            "seconds": s["seconds"],
        }
    return {"reference": reference_summary, "artifacts": results, "images": len(samples), "domains": domains}


def versions() -> dict[str, str | None]:
    """Versions of the pieces an export depends on (None for what is not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for module in ("onnx", "onnxruntime", "onnxscript", "tensorrt"):
        try:
            out[module] = __import__(module).__version__
        except Exception:  # not installed, or a broken install: either way nothing to report
            out[module] = None
    return out


def write_report(path: str | os.PathLike[str], report: dict[str, Any]) -> Path:
    """Write ``report`` as JSON atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"format": REPORT_FORMAT, **report}, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def format_summary(report: dict[str, Any]) -> str:
    """The artifact table printed at the end of an export."""
    lines = [f"{'artifact':<22} {'size MB':>9} {'export s':>9} {'max|Δlogit|':>12} {'rel. error':>10} "
             f"{'argmax agree':>13} {'mIoU':>7} {'ΔmIoU':>7}  parity"]
    ref = report.get("parity", {}).get("reference")
    if ref is not None:
        lines.append(f"{'pytorch fp32 (ref)':<22} {'':>9} {'':>9} {'':>12} {'':>10} {'':>13} {ref['miou']:7.2f} "
                     f"{'':>7}")
    for art in report.get("artifacts", []):
        p = art.get("parity")
        size = f"{art['bytes'] / 2**20:9.2f}" if art.get("bytes") is not None else f"{'':>9}"
        secs = f"{art['export_seconds']:9.1f}" if art.get("export_seconds") is not None else f"{'':>9}"
        if p:
            verdict = "" if "passed" not in p else "pass" if p["passed"] else "FAIL"
            lines.append(f"{art['name']:<22} {size} {secs} {p['max_abs_logit_error']:12.2e} "
                         f"{p.get('logit_rel_error', math.nan):10.2e} {100 * p['argmax_agreement']:12.3f}% "
                         f"{p['miou']:7.2f} {p['miou_delta']:+7.2f}  {verdict}")
        else:
            lines.append(f"{art['name']:<22} {size} {secs}   {art.get('note', 'not evaluated')}")
    return "\n".join(lines)
