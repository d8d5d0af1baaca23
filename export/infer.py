"""``python -m export.infer``: segment a folder of images with any exported model and save pictures.

    python -m export.infer --model exports/tiny/model_fp16.onnx --images photos/ --out masks/ [--batch 4]

``--model`` is a ``.onnx`` file (ONNX Runtime), a TensorRT ``.engine``, an AOTInductor ``.pt2`` or a student
checkpoint (``.safetensors``). Every image is resized to the model's input size (the export size; for a checkpoint, its
config's inference window), segmented, and the label map is resized back (nearest) to the image. For each
``photos/a/b.jpg`` the output holds ``masks/a/b_mask.png`` (colour-coded classes) and ``masks/a/b_overlay.png``
(the colours blended over the photo). A non-empty ``--out`` is refused unless ``--overwrite`` is given; an ``--out``
inside ``--images`` is not searched for images. An unreadable image is reported and skipped; the others are still
written. Exit codes: 0 all written, 1 some images failed, 2 bad arguments (one ``error:`` line).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from qd_core.data.files import is_hidden, refuse_non_empty_dir

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DEVICE = re.compile(r"cpu|cuda(:\d+)?|auto")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.infer",
                                description="Segment a folder of images with an exported QueryDiff model.")
    p.add_argument("--model", type=Path, required=True,
                   help="a .onnx file, a TensorRT .engine, an AOTInductor .pt2, or a student checkpoint "
                        "(.safetensors)")
    p.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for the *_mask.png and *_overlay.png files, mirroring the layout under --images "
                        "(created; refused when not empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    p.add_argument("--batch", type=int, default=1, help="images per model call (default 1)")
    p.add_argument("--device", default=None,
                   help="cpu / cuda / cuda:N / auto (default: auto for .onnx, cuda for .engine, the package's "
                        "device for .pt2, cpu for a checkpoint; ONNX Runtime takes no cuda:N)")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="opacity of the class colours in the overlay, in [0, 1] (default 0.5)")
    return p


def list_images(folder: Path, out: Path | None = None) -> list[Path]:
    """Image files under ``folder`` (recursively, sorted), leaving out those under the output folder ``out`` (an
    --out inside --images would otherwise have its masks segmented on the next run); ValueError if the folder is
    missing or has none."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--images '{folder}': is a file; expected a folder of images (searched recursively)")
    if not folder.is_dir():
        raise ValueError(f"--images '{folder}': folder not found")
    skip = out.resolve() if out is not None else None
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not is_hidden(p) and not (skip is not None and p.resolve().is_relative_to(skip)))
    if not found:
        raise ValueError(f"--images '{folder}': no images ({', '.join(IMAGE_EXTENSIONS)}) found (searched "
                         f"recursively)")
    return found


def resolve_device(device: str | None, model: Path) -> str | None:
    """``--device`` as ``load_segmenter`` takes it for ``model``'s backend, checked before anything is loaded (a bad
    name would otherwise surface as a backend's load failure). "auto" is ONNX Runtime's own choice; for the other
    backends it means: an engine's CUDA device, a .pt2 package's compiled device, CUDA for a checkpoint when this
    machine has it."""
    if device is None:
        return None
    if not DEVICE.fullmatch(device):
        raise ValueError(f"--device '{device}': expected cpu, cuda, cuda:N or auto")
    if model.suffix.lower() == ".onnx":
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device '{device}': ONNX Runtime takes cpu, cuda or auto")
        return device  # ONNX Runtime reports a missing CUDA provider itself
    if device == "auto":
        return _auto_device(model)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device '{device}': this machine has no CUDA device; use --device cpu")
    return device


def _auto_device(model: Path) -> str | None:
    """What "auto" means for a backend other than ONNX Runtime."""
    suffix = model.suffix.lower()
    if suffix == ".engine":
        return "cuda"  # an engine runs nowhere else; the backend says so when CUDA is missing
    if suffix == ".pt2":
        return None  # the device the package was compiled for
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming the flag for each value that can be refused before the model is loaded."""
    if args.batch < 1:
        raise ValueError(f"--batch {args.batch}: expected a positive number of images")
    if not 0 <= args.alpha <= 1:  # also refuses NaN
        raise ValueError(f"--alpha {args.alpha}: expected an opacity in [0, 1] (0: the photo alone, 1: the class "
                         f"colours alone)")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out '{args.out}': exists and is not a folder; expected an output folder (created if "
                         f"missing)")
    refuse_non_empty_dir(args.out, args.overwrite, "--out")


def model_input_size(segmenter: object) -> tuple[int, int]:
    """The (H, W) to resize images to: the backend's fixed size, or a checkpoint config's inference window."""
    size = getattr(segmenter, "input_size", None)
    if size is not None:
        return int(size[0]), int(size[1])
    wrapper = getattr(segmenter, "wrapper", None)
    cfg = getattr(getattr(wrapper, "model", None), "cfg", None)
    if cfg is not None:
        return int(cfg.inference.window[0]), int(cfg.inference.window[1])
    return 512, 512


def _outputs(out: Path, images_root: Path, image: Path) -> tuple[Path, Path]:
    rel = image.relative_to(images_root)
    base = out / rel.parent / rel.stem
    return base.with_name(base.name + "_mask.png"), base.with_name(base.name + "_overlay.png")


def check_output_clashes(images: Sequence[Path], images_root: Path) -> None:
    """ValueError naming two images that would write the same mask (same folder and stem, e.g. a.png and a.jpg):
    the second would silently replace the first."""
    seen: dict[Path, Path] = {}
    for image in images:
        key = _outputs(Path(), images_root, image)[0]
        if key in seen:
            raise ValueError(f"--images: '{seen[key]}' and '{image}' would both write '{key}' under --out; rename "
                             f"one of them")
        seen[key] = image


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from qd_core.data.files import read_image
    from qd_core.data.transforms import resize_image, resize_label
    from qd_core.visualize import colorize, overlay, save_png

    from export.runtime import load_segmenter

    check_args(args)
    device = resolve_device(args.device, args.model)
    images = list_images(args.images, args.out)
    check_output_clashes(images, args.images)
    segmenter = load_segmenter(args.model, device=device)
    height, width = model_input_size(segmenter)
    args.out.mkdir(parents=True, exist_ok=True)

    failed: list[str] = []
    bar = tqdm(total=len(images), desc=f"segmenting with {args.model.name}", unit="img")
    for start in range(0, len(images), args.batch):
        chunk = images[start:start + args.batch]
        originals, inputs, paths = [], [], []
        for path in chunk:
            try:
                rgb = read_image(path)
            except (ValueError, FileNotFoundError) as e:
                failed.append(str(e))
                tqdm.write(f"skipped: {e}")
                bar.update()
                continue
            originals.append(rgb)
            resized = np.array(resize_image(rgb, (height, width)), dtype=np.float32)
            inputs.append(torch.from_numpy(resized).permute(2, 0, 1))
            paths.append(path)
        if not inputs:
            continue
        labels = segmenter.predict(torch.stack(inputs)).cpu().numpy()
        for rgb, label, path in zip(originals, labels, paths):
            full = resize_label(label.astype(np.uint8), rgb.shape[:2])
            mask_path, overlay_path = _outputs(args.out, args.images, path)
            save_png(colorize(full), mask_path)
            save_png(overlay(rgb, full, alpha=args.alpha), overlay_path)
            bar.update()
    bar.close()
    written = len(images) - len(failed)
    print(f"wrote {written} mask/overlay pairs to {args.out}" + (f"; {len(failed)} image(s) skipped" if failed else ""))
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write to --out '{args.out}': {e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
