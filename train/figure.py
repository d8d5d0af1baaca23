"""One picture of a student on the synthetic scenes: a row per domain of input | ground truth | prediction.

    python -m train.figure --checkpoint runs/tiny/best.safetensors --out docs/default-run.png
                           [--data data/synthetic] [--index 3] [--domains source fog night art] [--scale 0.6]
                           [--device cpu]

The same validation scene is shown under every domain (the target domains are shifted copies of the source
validation scenes), so the rows show what each shift does to the prediction. Scenes are scored as in training
(the config's test size and inference mode); each row names its domain and the scene's pixel accuracy, and a
legend of the 19 class colours closes the picture.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from qd_core.classes import CITYSCAPES_PALETTE
from qd_core.config import Config, DatasetSpec
from qd_core.data.labels import CLASS_NAMES, IGNORE_INDEX
from qd_core.visualize import colorize, panel, save_png

GAP = 4
TEXT_H = 14  # rows of pixels for one line of Pillow's default bitmap font
WHITE = (255, 255, 255)


def domain_spec(cfg: Config, domain: str, root: str) -> DatasetSpec:
    """The config's validation spec of a synthetic domain (for its test size), pointed at ``root``."""
    from train.data import val_specs

    for spec in val_specs(cfg):
        if spec.kind == "synthetic" and (spec.domain or "source") == domain:
            return DatasetSpec(kind="synthetic", root=root, split=spec.split, domain=domain,
                               test_size=list(spec.test_size))
    return DatasetSpec(kind="synthetic", root=root, split="val", domain=domain)


def _caption(text: str, width: int) -> np.ndarray:
    strip = Image.new("RGB", (width, TEXT_H + 4), WHITE)
    ImageDraw.Draw(strip).text((2, 2), text, fill=(0, 0, 0))
    return np.asarray(strip)


def legend(width: int, columns: int = 5) -> np.ndarray:
    """A white strip with a colour swatch and the name of each of the 19 classes, ``columns`` per line."""
    rows = -(-len(CLASS_NAMES) // columns)
    cell = width // columns
    strip = Image.new("RGB", (width, rows * (TEXT_H + 4) + 4), WHITE)
    draw = ImageDraw.Draw(strip)
    for i, (name, colour) in enumerate(zip(CLASS_NAMES, CITYSCAPES_PALETTE)):
        x, y = (i % columns) * cell + 4, (i // columns) * (TEXT_H + 4) + 4
        draw.rectangle((x, y, x + TEXT_H - 2, y + TEXT_H - 2), fill=tuple(colour))
        draw.text((x + TEXT_H + 2, y), name, fill=(0, 0, 0))
    return np.asarray(strip)


def pixel_accuracy(label: np.ndarray, pred: np.ndarray) -> float:
    """Share of the labelled (not ignored) pixels predicted right; NaN when none is labelled."""
    valid = label != IGNORE_INDEX
    return float((pred[valid] == label[valid]).mean()) if valid.any() else float("nan")


def scene_row(image: np.ndarray, label: np.ndarray, pred: np.ndarray, title: str, accuracy: float) -> np.ndarray:
    """(H, W, 3) image, (H, W) label and prediction → captioned panel of the three, RGB uint8."""
    row = panel(image, colorize(label), colorize(pred), gap=GAP)
    return np.concatenate([_caption(f"{title}: input | ground truth | prediction "
                                    f"(pixel accuracy {100 * accuracy:.1f} %)", row.shape[1]), row])


def _resize(array: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """(H, W[, 3]) uint8 → (h, w[, 3]) for ``size`` = (h, w)."""
    return np.asarray(Image.fromarray(array).resize(size[::-1], resample))


def synthetic_domains() -> tuple[str, ...]:
    """The domains the synthetic generator writes: the source and its shifted copies."""
    from qd_core.data.corruptions import TARGET_DOMAINS
    from qd_core.data.synthetic import SOURCE_DOMAIN

    return (SOURCE_DOMAIN, *TARGET_DOMAINS)


def check_request(out: Path, domains: Sequence[str], scale: float) -> None:
    """ValueError naming the flag for what can be refused before the checkpoint is loaded and the scenes are
    predicted (the expensive part): a picture could never be written to a folder, nor read from an unknown domain."""
    if not domains:
        raise ValueError("--domains: expected at least one domain")
    unknown = [d for d in domains if d not in synthetic_domains()]
    if unknown:
        raise ValueError(f"--domains {' '.join(unknown)}: no such synthetic domain; expected some of "
                         f"{' '.join(synthetic_domains())}")
    if not 0.05 <= scale <= 4:
        raise ValueError(f"--scale {scale}: expected a factor in [0.05, 4]")
    if out.is_dir():
        raise ValueError(f"--out '{out}': is a directory; expected the path of the PNG file to write")
    if out.parent.exists() and not out.parent.is_dir():
        raise ValueError(f"--out '{out}': '{out.parent}' is not a folder")


def write_png(picture: np.ndarray, out: Path) -> Path:
    """``picture`` as the PNG ``out`` (atomically, nothing half-written on failure); ValueError naming --out."""
    try:
        return save_png(picture, out)
    except OSError as e:
        raise ValueError(f"--out '{out}': cannot write the picture: {e.strerror or e}") from None


def make_figure(checkpoint: Path, out: Path, *, data: str | None = None, index: int = 0,
                domains: Sequence[str] = ("source", "fog", "night", "art"), scale: float = 1.0,
                device: str | None = None) -> Path:
    """Predict scene ``index`` of each domain with the student and write the picture to ``out``, each panel at
    ``scale`` × the label's resolution; returns the path."""
    from qd_core.checkpoint import load_student
    from qd_core.data.files import read_image
    from train.data import build_dataset, eval_transform
    from train.distributed import resolve_device
    from train.evaluate import predict_dataset

    check_request(out, domains, scale)
    dev = resolve_device(device)
    model, cfg = load_student(checkpoint, device=dev)
    root = data or cfg.data.synthetic.root
    rows = []
    for domain in domains:
        spec = domain_spec(cfg, domain, root)
        dataset = build_dataset(spec, cfg, eval_transform(spec, cfg))
        if not 0 <= index < len(dataset):
            raise ValueError(f"--index {index}: {spec.display_name()} in '{root}' has {len(dataset)} scenes")
        pred = next(predict_dataset(model, dataset, device=dev, mode=None, indices=[index]))
        if pred.label is None:
            raise ValueError(f"{pred.image_path}: no label to compare with")
        h, w = pred.pred.shape
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        image = _resize(read_image(pred.image_path), size, Image.BILINEAR)
        label = _resize(pred.label.astype(np.uint8), size, Image.NEAREST)  # train ids and 255 fit a byte
        rows.append(scene_row(image, label, _resize(pred.pred, size, Image.NEAREST), domain,
                              pixel_accuracy(pred.label, pred.pred)))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, GAP), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return write_png(np.concatenate([*rows, legend(width)]), out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.figure",
                                description="Picture of a student on the synthetic scenes: per domain, input | "
                                            "ground truth | prediction of one validation scene.")
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="student checkpoint (.safetensors with its .json beside it)")
    p.add_argument("--out", required=True, type=Path, help="PNG file to write (replaced if it exists)")
    p.add_argument("--data", default=None,
                   help="synthetic data root (default: the checkpoint config's data.synthetic.root)")
    p.add_argument("--index", type=int, default=0, help="validation scene to show (default 0)")
    p.add_argument("--domains", nargs="+", default=["source", "fog", "night", "art"],
                   help="domains, one row each (default: source fog night art)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="size of each panel relative to the label resolution (default 1.0)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from qd_core.checkpoint import CheckpointError

    try:
        path = make_figure(args.checkpoint, args.out, data=args.data, index=args.index, domains=args.domains,
                           scale=args.scale, device=args.device)
    except (OSError, ValueError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
