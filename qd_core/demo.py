"""Segment one image with a QueryDiff student and save colour-coded pictures.

    python -m qd_core.demo                       # tiny random student on a generated street scene
    python -m qd_core.demo --checkpoint runs/x/best.safetensors --image photo.png

Writes into --out: input.png, prediction.png (colour-coded classes), overlay.png, panel.png (side by side;
with the scene's ground truth when the scene was generated), labels.png (raw train ids).
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
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. inference.mode=whole")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    try:
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
    save_png(image, args.out / "input.png")
    save_png(pred_rgb, args.out / "prediction.png")
    save_png(labels, args.out / "labels.png")
    save_png(overlay(image, labels), args.out / "overlay.png")
    save_png(panel(*parts), args.out / "panel.png")

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
