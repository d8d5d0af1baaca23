"""Segment one image with a QueryDiff student and save colour-coded pictures.

    python -m qd_core.demo                       # tiny random student on a generated street scene
    python -m qd_core.demo --checkpoint runs/x/best.safetensors --image photo.png

Writes into --out: input.png, prediction.png (colour-coded classes), overlay.png, panel.png (side by side;
with the scene's ground truth when the scene was generated), labels.png (raw train ids), each written whole.
A folder already holding any of these five is refused unless --overwrite is given; other files are left alone.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qd_core.classes import CITYSCAPES_CLASSES
from qd_core.config import ConfigError, load_config
from qd_core.visualize import colorize, overlay, panel, save_png


def load_rgb(path: Path) -> np.ndarray:
    from qd_core.data.files import read_image

    return read_image(path)


# What one run writes into --out (the names check_args looks for before anything is replaced).
PICTURES = ("input.png", "prediction.png", "labels.png", "overlay.png", "panel.png")


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming the flag for inputs that would otherwise fail only after the model is built (or as a
    traceback from deep inside it)."""
    from qd_core.data.scenes import MIN_SIZE

    if min(args.size) < MIN_SIZE:
        raise ValueError(f"--size {args.size[0]} {args.size[1]}: expected a height and width of at least {MIN_SIZE} "
                         f"pixels each")
    if args.image is not None and args.image.is_dir():
        raise ValueError(f"--image '{args.image}': is a directory; expected an image file")
    if args.image is not None and not args.image.exists():
        raise ValueError(f"--image '{args.image}': no such file; expected an image file")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out '{args.out}': exists and is not a folder; expected an output folder (created if "
                         f"missing)")
    earlier = [name for name in PICTURES if (args.out / name).exists()]
    if earlier and not args.overwrite:
        raise ValueError(f"--out '{args.out}': holds {', '.join(earlier)} from an earlier run; pass --overwrite to "
                         f"replace them")


def write_pictures(out: Path, pictures: dict[str, np.ndarray]) -> None:
    """Each array as the PNG ``out/<name>`` (atomically, nothing half-written on failure); an OSError carries the
    path that could not be written."""
    for name, array in pictures.items():
        try:
            save_png(array, out / name)
        except OSError as e:
            e.filename = str(out / name)  # the temp file's name would mean nothing to the user
            raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qd_core.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny", help="shipped config name or YAML path (default: tiny)")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="student checkpoint (.safetensors + .json); default: randomly initialised weights")
    ap.add_argument("--image", type=Path, default=None, help="RGB image to segment; default: a generated scene")
    ap.add_argument("--size", type=int, nargs=2, default=[256, 512], metavar=("H", "W"),
                    help="size of the generated scene (default 256 512)")
    ap.add_argument("--mode", choices=["whole", "slide"], default=None, help="inference mode (default: config's)")
    ap.add_argument("--seed", type=int, default=0, help="seed for weights and the generated scene (default 0)")
    ap.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder (default outputs/demo)")
    ap.add_argument("--overwrite", action="store_true", help="replace the pictures of an earlier run in --out")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. inference.mode=whole")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    try:
        check_args(args)
        if args.checkpoint is not None:
            from qd_core.checkpoint import load_student

            model, cfg = load_student(args.checkpoint, args.overrides)
        else:
            from qd_core.model import build_student

            cfg = load_config(args.config, args.overrides)
            model = build_student(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.eval()

    truth = None
    if args.image is not None:
        try:
            image = load_rgb(args.image)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        from qd_core.data.scenes import draw_scene

        image, truth = draw_scene(args.size[0], args.size[1], np.random.default_rng(args.seed))

    x = model.normalize(torch.from_numpy(image).permute(2, 0, 1)[None])
    start = time.perf_counter()
    labels = model.predict(x, mode=args.mode)[0].numpy().astype(np.uint8)
    took = time.perf_counter() - start

    pred_rgb = colorize(labels)
    parts = [image, pred_rgb] + ([colorize(truth)] if truth is not None else [])
    try:
        pictures = {"input.png": image, "prediction.png": pred_rgb, "labels.png": labels,
                    "overlay.png": overlay(image, labels), "panel.png": panel(*parts)}
        write_pictures(args.out, pictures)
    except OSError as e:  # a read-only folder, a full disk: one line, not a traceback
        print(f"error: --out '{args.out}': cannot write {e.filename or 'the pictures'}: {e.strerror or e}",
              file=sys.stderr)
        return 2

    weights = str(args.checkpoint) if args.checkpoint else "random init (no checkpoint)"
    print(f"config {cfg.name}, weights: {weights}, image {image.shape[1]}x{image.shape[0]}, "
          f"{cfg.inference.mode if args.mode is None else args.mode} inference in {took:.2f} s")
    counts = np.bincount(labels.ravel(), minlength=len(CITYSCAPES_CLASSES))
    top = np.argsort(counts)[::-1][:5]
    print("most predicted: " + ", ".join(f"{CITYSCAPES_CLASSES[i]} {100 * counts[i] / labels.size:.1f}%"
                                         for i in top if counts[i]))
    if truth is not None:
        valid = truth != 255
        print(f"pixel accuracy against the scene's ground truth: {100 * (labels[valid] == truth[valid]).mean():.1f}%")
    print(f"wrote {args.out}/panel.png (input | prediction{' | ground truth' if truth is not None else ''}), "
          f"prediction.png, overlay.png, labels.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
