"""Segment every image of a folder with a student checkpoint and write colour-coded predictions and overlays.

    python -m train.visualize --checkpoint runs/tiny/best.safetensors --images photos/ --out outputs/vis

For each image ``a/b.jpg`` below --images: ``a__b_pred.png`` (classes in the Cityscapes colours) and
``a__b_overlay.png`` (the prediction blended over the image), at the image's own size. Images are resized for
inference like a test set (keep ratio into --size, default the config's window ×(2, 1)). A non-empty --out needs
--overwrite; an --out inside --images is not searched for images. An unreadable image is reported and skipped, the
others are still written (exit code 1).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from qd_core.config import DatasetSpec
from qd_core.data.datasets import Sample
from train.data import build_dataset, default_test_size, eval_transform


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.visualize",
                                description="Colour-coded predictions and overlays for a folder of images.")
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="student checkpoint (.safetensors with its .json beside it)")
    p.add_argument("--images", required=True, type=Path, help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    p.add_argument("--mode", choices=["whole", "slide"], default=None,
                   help="inference mode (default: the config's inference.mode)")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("LONG", "SHORT"),
                   help="test-time keep-ratio box (default: twice the inference window by once)")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the prediction (default 0.5)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs, scripts)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of the checkpoint's config, e.g. inference.mode=whole")
    return p


def images_to_write(samples: list[Sample], images_root: Path, out: Path) -> list[Sample]:
    """``samples`` less those under ``out`` (an --out inside --images would otherwise have its pictures segmented
    on the next run); ValueError when nothing is left or when two images would write the same pictures (``a/b.jpg``
    and ``a/b.png``, or ``a/b.jpg`` and ``a__b.jpg``: the second would silently replace the first)."""
    from train.evaluate import output_name

    skip = out.resolve()
    kept = [s for s in samples if not s.image.resolve().is_relative_to(skip)]
    if not kept:
        raise ValueError(f"--images '{images_root}': no images outside --out '{out}'")
    seen: dict[str, Path] = {}
    for sample in kept:
        name = output_name(str(sample.image), images_root)
        if name in seen:
            raise ValueError(f"--images: '{seen[name]}' and '{sample.image}' would both write {name}_pred.png; "
                             f"rename one of them")
        seen[name] = sample.image
    return kept


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from qd_core.checkpoint import load_student
    from train.distributed import resolve_device
    from train.evaluate import check_output_dir, output_name, predict_dataset, save_visuals

    try:
        if not 0.0 <= args.alpha <= 1.0:
            raise ValueError(f"--alpha {args.alpha}: expected a value in [0, 1]")
        if args.size is not None and min(args.size) < 1:
            raise ValueError(f"--size {args.size}: expected two positive integers")
        device = resolve_device(args.device)
        model, cfg = load_student(args.checkpoint, args.overrides, device=device)
        size = list(args.size) if args.size else default_test_size("folder", cfg.inference.window)
        spec = DatasetSpec(kind="folder", root=str(args.images), test_size=size)
        dataset = build_dataset(spec, cfg, eval_transform(spec, cfg))
        dataset.samples = images_to_write(dataset.samples, args.images, args.out)
        check_output_dir(args.out, args.overwrite, "--out")
        count, skipped = 0, []

        def skip(message: str) -> None:
            tqdm.write(f"skipped: {message}", file=sys.stderr)
            skipped.append(message)

        for pred in predict_dataset(model, dataset, device=device, mode=args.mode, num_workers=args.num_workers,
                                    progress=not args.no_progress, desc="visualize", on_error=skip):
            save_visuals(pred, args.out, output_name(pred.image_path, args.images), args.alpha)
            count += 1
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote predictions and overlays of {count} images to {args.out}"
          + (f"; {len(skipped)} unreadable image(s) skipped" if skipped else ""))
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
