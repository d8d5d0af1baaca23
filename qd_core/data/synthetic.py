"""The embedded data set: procedurally drawn street scenes in the Cityscapes layout (DESIGN §7).

    python -m qd_core.data.synthetic --out data/synthetic [--seed 0] [--num-train 200] [--num-val 30]
                                     [--size 256 512] [--overwrite]

writes ::

    OUT/manifest.json
    OUT/source/leftImg8bit/{train,val}/synth/synth_000000_leftImg8bit.png
    OUT/source/gtFine/{train,val}/synth/synth_000000_gtFine_labelTrainIds.png
    OUT/<domain>/leftImg8bit/val/synth/...   and   OUT/<domain>/gtFine/val/synth/...
        for domain in fog, snow, frost, night, rain, art

so ``cityscapes_dataset(OUT / "source", "train")`` and ``cityscapes_dataset(OUT / domain, "val")`` read it. Every
target domain shows the source val scenes under its appearance shift (same labels), so the gap between the
source-val and a target-domain score measures that shift alone.

Each image has its own generator seeded by (seed, split or domain, index): the same seed gives the same bytes,
and a smaller run is a prefix of a larger one. The tree is written to a temporary sibling folder and renamed into
place when complete, with the manifest written last, so a folder with a manifest is always whole.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from qd_core.data.corruptions import TARGET_DOMAINS, apply_domain
from qd_core.data.files import write_dir
from qd_core.data.labels import CLASS_NAMES
from qd_core.data.scenes import MIN_SIZE, draw_scene

GENERATOR = "qd_core.data.synthetic"
# Bump when the drawing or the shifts change, so cached folders made by an older version are not reused.
GENERATOR_VERSION = 2
SOURCE_DOMAIN = "source"
CITY = "synth"
DEFAULT_SIZE = (256, 512)
# Settings whose change makes an existing folder a different data set.
_IDENTITY_KEYS = ("generator", "version", "seed", "size", "num_train", "num_val", "target_domains")


def image_path(root: Path, domain: str, split: str, index: int) -> Path:
    """Where scene ``index`` of ``domain``/``split`` is stored, in the Cityscapes layout."""
    return root / domain / "leftImg8bit" / split / CITY / f"{CITY}_{index:06d}_leftImg8bit.png"


def label_path(root: Path, domain: str, split: str, index: int) -> Path:
    """The train-id label of ``image_path(root, domain, split, index)``."""
    return root / domain / "gtFine" / split / CITY / f"{CITY}_{index:06d}_gtFine_labelTrainIds.png"


def _manifest(seed: int, num_train: int, num_val: int, size: tuple[int, int]) -> dict[str, Any]:
    domains: dict[str, dict[str, int]] = {SOURCE_DOMAIN: {"train": num_train, "val": num_val}}
    domains.update({d: {"val": num_val} for d in TARGET_DOMAINS})
    return {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "seed": seed,
        "size": list(size),
        "num_train": num_train,
        "num_val": num_val,
        "source_domain": SOURCE_DOMAIN,
        "target_domains": list(TARGET_DOMAINS),
        "domains": domains,
        "layout": "cityscapes",
        "image": f"<domain>/leftImg8bit/<split>/{CITY}/{CITY}_<index:06d>_leftImg8bit.png",
        "label": f"<domain>/gtFine/<split>/{CITY}/{CITY}_<index:06d>_gtFine_labelTrainIds.png",
        "classes": list(CLASS_NAMES),
    }


def _check_args(seed: int, num_train: int, num_val: int, size: Sequence[int]) -> tuple[int, int]:
    if seed < 0:
        raise ValueError(f"seed must be ≥ 0, got {seed}")
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be ≥ 1, got {num_train} and {num_val}")
    if len(size) != 2 or min(size) < MIN_SIZE:
        raise ValueError(f"size must be (H, W) with both ≥ {MIN_SIZE} (the corruption library's minimum), "
                         f"got {tuple(size)}")
    return int(size[0]), int(size[1])


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Fast zlib level: the grain makes the images nearly incompressible anyway, and the bytes stay deterministic.
    Image.fromarray(array).save(path, compress_level=1)


def _write_tree(tmp: Path, seed: int, num_train: int, num_val: int, size: tuple[int, int], progress: bool) -> None:
    h, w = size
    total = num_train + num_val * (1 + len(TARGET_DOMAINS))
    with tqdm(total=total, desc="synthetic scenes", unit="img", disable=not progress) as bar:
        for index in range(num_train):
            image, label = draw_scene(h, w, np.random.default_rng([seed, 0, index]))
            _save(image, image_path(tmp, SOURCE_DOMAIN, "train", index))
            _save(label, label_path(tmp, SOURCE_DOMAIN, "train", index))
            bar.update()
        for index in range(num_val):
            image, label = draw_scene(h, w, np.random.default_rng([seed, 1, index]))
            _save(image, image_path(tmp, SOURCE_DOMAIN, "val", index))
            src_label = label_path(tmp, SOURCE_DOMAIN, "val", index)
            _save(label, src_label)
            bar.update()
            for k, domain in enumerate(TARGET_DOMAINS):
                shifted = apply_domain(domain, image, np.random.default_rng([seed, 100 + k, index]))
                _save(shifted, image_path(tmp, domain, "val", index))
                dst_label = label_path(tmp, domain, "val", index)
                dst_label.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src_label, dst_label)
                bar.update()
    manifest = _manifest(seed, num_train, num_val, size)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(root: str | Path) -> dict[str, Any] | None:
    """The manifest of a generated folder, or None when ``root`` holds none."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable synthetic-data manifest ({err})") from None


def data_identity(root: str | Path) -> dict[str, Any] | None:
    """The settings that make ``root``'s scenes what they are (generator version, seed, size, counts), or None
    when it holds no generated data. Things made from the scenes (the tiny teacher, the stand-in backbone)
    record it and are remade when it changes."""
    try:
        manifest = read_manifest(root)
    except ValueError:
        return None
    return None if manifest is None else {k: manifest.get(k) for k in _IDENTITY_KEYS}


def generate_synthetic(out: str | Path, seed: int = 0, num_train: int = 200, num_val: int = 30,
                       size: Sequence[int] = DEFAULT_SIZE, overwrite: bool = False, progress: bool = True) -> Path:
    """Draw the scenes and write the whole tree to ``out``; returns ``out``.

    A non-empty ``out`` is replaced only with ``overwrite=True`` (and only once the new tree is complete).
    """
    h, w = _check_args(seed, num_train, num_val, size)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: folder is not empty; pass --overwrite (overwrite=True) to replace it")
    write_dir(out, lambda tmp: _write_tree(tmp, seed, num_train, num_val, (h, w), progress))
    return out


def ensure_synthetic(root: str | Path, seed: int = 0, num_train: int = 200, num_val: int = 30,
                     size: Sequence[int] = DEFAULT_SIZE, overwrite: bool = False, progress: bool = True) -> Path:
    """Return ``root`` holding the synthetic data with these settings, generating it only if absent.

    A folder generated by an older version of the generator is regenerated (its scenes cannot be drawn again
    by this code, and the same settings now draw other ones); one generated with other settings is an error
    unless ``overwrite=True``, which regenerates it. Call from one process only (rank 0 under DDP, then a barrier).
    """
    h, w = _check_args(seed, num_train, num_val, size)
    root = Path(root)
    manifest = read_manifest(root)
    if manifest is not None:
        wanted = _manifest(seed, num_train, num_val, (h, w))
        diff = [k for k in _IDENTITY_KEYS if manifest.get(k) != wanted[k]]
        if not diff:
            return root
        if diff == ["version"] and isinstance(manifest.get("version"), int) and manifest["version"] < GENERATOR_VERSION:
            print(f"{root}: synthetic scenes of generator version {manifest['version']}; drawing version "
                  f"{GENERATOR_VERSION} in their place", file=sys.stderr)
            overwrite = True
        if not overwrite:
            k = diff[0]
            raise ValueError(f"{root}: holds synthetic data with {k}={manifest.get(k)!r}, wanted {wanted[k]!r}; "
                             f"use another folder or overwrite=True to regenerate")
    return generate_synthetic(root, seed, num_train, num_val, (h, w), overwrite=overwrite, progress=progress)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qd_core.data.synthetic",
        description="Draw synthetic street scenes (source domain + fog/snow/frost/night/rain/art targets) in the "
                    "Cityscapes layout.")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created; see --overwrite)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same bytes")
    parser.add_argument("--num-train", type=int, default=200, help="source-domain training scenes")
    parser.add_argument("--num-val", type=int, default=30, help="validation scenes, per domain")
    parser.add_argument("--size", type=int, nargs=2, default=list(DEFAULT_SIZE), metavar=("H", "W"),
                        help="image height and width in pixels")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    try:
        out = generate_synthetic(args.out, args.seed, args.num_train, args.num_val, args.size,
                                 overwrite=args.overwrite, progress=not args.no_progress)
    except (ValueError, FileExistsError) as err:
        parser.error(str(err))
    total = args.num_train + args.num_val * (1 + len(TARGET_DOMAINS))
    print(f"wrote {total} images ({args.num_train} train, {args.num_val} val x {1 + len(TARGET_DOMAINS)} domains: "
          f"{SOURCE_DOMAIN}, {', '.join(TARGET_DOMAINS)}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
