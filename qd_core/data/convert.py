"""Converters from the published datasets to train-id labels (METHOD §8.2).

    python -m qd_core.data.convert gta data/gta
    python -m qd_core.data.convert cityscapes data/cityscapes
    python -m qd_core.data.convert mapillary data/mapillary data/mapillary/cityscapes_trainIdLabel --train_id
    python -m qd_core.data.convert mapillary-resize data/mapillary/validation/images \\
        data/mapillary/cityscapes_trainIdLabel/val/label data/mapillary/half/val_img data/mapillary/half/val_label

Every output file is written to a temporary sibling and renamed into place, so an interrupted run leaves only
whole files; existing outputs are skipped (a rerun resumes) unless ``--overwrite`` is given.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from qd_core.data.files import is_hidden, read_image, read_label, save_image_atomic, save_label_atomic
from qd_core.data.labels import CLASS_NAMES, IGNORE_INDEX, LABEL_ID_TO_TRAIN_ID, label_id_lut

# ----------------------------------------------------------------------------------------------------------------
# GTA5: Cityscapes label ids → train ids, written next to the source as <name>_labelTrainIds.png
# ----------------------------------------------------------------------------------------------------------------

GTA_SUFFIX = "_labelTrainIds.png"


def gta_output(label: Path) -> Path:
    """``labels/00001.png`` → ``labels/00001_labelTrainIds.png``."""
    return label.with_name(label.stem + GTA_SUFFIX)


def convert_gta_label(src: Path, dst: Path) -> None:
    """Map one GTA5 label-id PNG to a train-id PNG (ids outside the 19 classes → 255)."""
    ids = read_label(src)
    if ids.dtype != np.uint8:
        raise ValueError(f"{src}: expected an 8-bit label-id PNG, got values up to {int(ids.max())}")
    save_label_atomic(label_id_lut()[ids], dst)


def gta_jobs(root: Path) -> list[tuple[Path, Path]]:
    """(source, output) for every label-id PNG under ``root/labels``."""
    folder = root / "labels"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: GTA5 labels folder not found")
    sources = sorted(p for p in folder.glob("*.png") if not p.name.endswith(GTA_SUFFIX) and not is_hidden(p))
    if not sources:
        raise FileNotFoundError(f"{folder}: no label-id files match '*.png'")
    return [(p, gta_output(p)) for p in sources]


# ----------------------------------------------------------------------------------------------------------------
# Cityscapes: polygons → train ids with cityscapesScripts' own rasteriser
# ----------------------------------------------------------------------------------------------------------------

CITYSCAPES_POLYGONS = "_gtFine_polygons.json"


def cityscapes_output(polygons: Path) -> Path:
    """``*_gtFine_polygons.json`` → ``*_gtFine_labelTrainIds.png`` in the same folder."""
    return polygons.with_name(polygons.name[: -len(CITYSCAPES_POLYGONS)] + "_gtFine_labelTrainIds.png")


def convert_cityscapes_polygons(src: Path, dst: Path) -> None:
    """Rasterise one Cityscapes polygon JSON to train ids via ``json2labelImg(..., "trainIds")``."""
    from cityscapesscripts.helpers.labels import name2label
    from cityscapesscripts.preparation.json2labelImg import json2labelImg

    try:
        annotation = json.loads(src.read_text())
        names = [obj["label"] for obj in annotation["objects"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{src}: not a Cityscapes polygon file ({err})") from None
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"{src}: not a Cityscapes polygon file (label {name!r} is not a string)")
        # cityscapesScripts accepts "<class>group" for crowds and exits the process on anything else.
        if name not in name2label and not (name.endswith("group") and name[: -len("group")] in name2label):
            raise ValueError(f"{src}: unknown Cityscapes label {name!r}")
    tmp = dst.with_name(f".{dst.stem}.tmp.png")
    try:
        try:
            json2labelImg(str(src), str(tmp), "trainIds")
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
            # A missing imgWidth/imgHeight/polygon or a polygon of fewer than two points, found by the rasteriser.
            raise ValueError(f"{src}: not a Cityscapes polygon file ({type(err).__name__}: {err})") from None
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)


def cityscapes_jobs(root: Path) -> list[tuple[Path, Path]]:
    """(polygon JSON, output) for every ``*_gtFine_polygons.json`` under ``root/gtFine``."""
    folder = root / "gtFine"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: Cityscapes gtFine folder not found")
    sources = sorted(p for p in folder.rglob("*" + CITYSCAPES_POLYGONS) if not is_hidden(p))
    if not sources:
        raise FileNotFoundError(f"{folder}: no files match '**/*{CITYSCAPES_POLYGONS}'")
    return [(p, cityscapes_output(p)) for p in sources]


# ----------------------------------------------------------------------------------------------------------------
# Mapillary Vistas: class names of config_<version>.json → Cityscapes train ids (or label ids)
# ----------------------------------------------------------------------------------------------------------------


def _squash(name: str) -> str:
    return name.lower().replace(" ", "").replace("-", "")


def mapillary_class(readable: str) -> str | None:
    """The Cityscapes class a Mapillary label name maps to, or None (ignored), by the rules of METHOD §8.2."""
    name = _squash(readable)
    exact = {_squash(c): c for c in CLASS_NAMES}
    if name in exact:
        return exact[name]
    rules = (
        (("trafficsign", "front", "back"), "traffic sign"),
        (("onrail",), "train"),
        (("cyclist", "rider"), "rider"),
        (("pole", "streetlight"), "pole"),
        (("curb", "pedestrianarea"), "sidewalk"),
        (("crosswalkplain", "parking", "bikelane", "servicelane", "lanemarking"), "road"),
    )
    for keys, cls in rules:  # first match wins, in this order
        if any(k in name for k in keys):
            return cls
    return None


def mapillary_lut(config: Path, train_id: bool = True) -> tuple[np.ndarray, int]:
    """(256,) uint8 table from Mapillary label index to train id (label id if not ``train_id``), and the number
    of labels in ``config``; unmapped labels → 255."""
    try:
        labels = json.loads(config.read_text())["labels"]
        readable = [str(entry["readable"]) for entry in labels]
    except FileNotFoundError:
        raise FileNotFoundError(f"{config}: Mapillary config file not found") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{config}: not a Mapillary config with labels[].readable ({err})") from None
    if len(readable) > 256:
        raise ValueError(f"{config}: {len(readable)} labels do not fit 8-bit label images")
    train_to_label = {t: i for i, t in LABEL_ID_TO_TRAIN_ID.items()}
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for index, name in enumerate(readable):
        cls = mapillary_class(name)
        if cls is not None:
            tid = CLASS_NAMES.index(cls)
            lut[index] = tid if train_id else train_to_label[tid]
    return lut, len(readable)


def convert_mapillary_label(src: Path, dst: Path, lut: np.ndarray, num_labels: int) -> None:
    """Map one Mapillary label-index PNG through ``lut``."""
    label = read_label(src)
    if label.size and int(label.max()) >= num_labels:
        raise ValueError(f"{src}: label index {int(label.max())} is beyond the {num_labels} labels of the config")
    save_label_atomic(lut[label], dst)


def mapillary_jobs(root: Path, out: Path, version: str) -> list[tuple[Path, Path]]:
    """(source, output) for ``root/{training,validation}/<version>/labels/*.png`` → ``out/{train,val}/label``."""
    jobs = []
    for split, name in (("training", "train"), ("validation", "val")):
        folder = root / split / version / "labels"
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: Mapillary labels folder not found")
        sources = sorted(p for p in folder.glob("*.png") if not is_hidden(p))
        if not sources:
            raise FileNotFoundError(f"{folder}: no files match '*.png'")
        jobs += [(p, out / name / "label" / p.name) for p in sources]
    return jobs


MAPILLARY_ENCODING = "label_encoding.json"  # in OUT: which ids the converted labels hold


def record_mapillary_encoding(out: Path, train_id: bool, version: str, overwrite: bool) -> None:
    """Refuse to add to an ``out`` written with the other ``--train_id`` setting, then record this run's.

    A rerun skips every existing output, so converting again with the other setting would silently keep the old
    ids (label ids 7..33 partly pass as train ids). Without ``overwrite`` the recorded encoding must match; outputs
    of a run that recorded none are left unjudged (and unrecorded)."""
    path = out / MAPILLARY_ENCODING
    want = "train" if train_id else "label"
    if not overwrite:
        if path.is_file():
            try:
                have = json.loads(path.read_text())["ids"]
            except (OSError, ValueError, KeyError, TypeError):
                have = None
            if have != want:
                flag = "with --train_id" if have == "train" else "without --train_id" if have == "label" else "?"
                raise ValueError(f"{path}: {out} holds labels converted {flag} ({have} ids), this run writes {want} "
                                 f"ids; pass --overwrite to convert them all again")
            return
        if any(any((out / split / "label").glob("*.png")) for split in ("train", "val")):
            return
    from qd_core.checkpoint import atomic_write  # imports torch: only this converter needs it

    text = json.dumps({"ids": want, "version": version}) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


# ----------------------------------------------------------------------------------------------------------------
# Mapillary half resolution: images bicubic, labels nearest
# ----------------------------------------------------------------------------------------------------------------


def resize_half(image_src: Path, label_src: Path, image_dst: Path, label_dst: Path, quality: int = 75) -> None:
    """Halve an image (bicubic, saved as JPEG) and its label (nearest, PNG); sizes are floored like the reference."""
    image = read_image(image_src)
    label = read_label(label_src)
    h, w = image.shape[:2]
    if label.shape != (h, w):
        raise ValueError(f"{label_src}: label size {label.shape[1]}x{label.shape[0]} (WxH) differs from image "
                         f"{image_src} size {w}x{h}")
    size = (max(1, w // 2), max(1, h // 2))
    save_image_atomic(Image.fromarray(image).resize(size, Image.BICUBIC), image_dst, quality=quality)
    save_label_atomic(np.asarray(Image.fromarray(label.astype(np.uint8)).resize(size, Image.NEAREST)), label_dst)


def resize_jobs(image_dir: Path, label_dir: Path, out_image_dir: Path,
                out_label_dir: Path) -> list[tuple[Path, Path, Path, Path]]:
    """(image, label, image out, label out) for every ``image_dir/*.jpg`` with its ``label_dir/<stem>.png``."""
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: image folder not found")
    images = sorted(p for p in image_dir.glob("*.jpg") if not is_hidden(p))
    if not images:
        raise FileNotFoundError(f"{image_dir}: no files match '*.jpg'")
    jobs = []
    for image in images:
        label = label_dir / f"{image.stem}.png"
        if not label.is_file():
            raise FileNotFoundError(f"{label}: label file not found (for image {image})")
        jobs.append((image, label, out_image_dir / image.name, out_label_dir / label.name))
    return jobs


# ----------------------------------------------------------------------------------------------------------------
# Running jobs
# ----------------------------------------------------------------------------------------------------------------


def _star(fn: Callable[..., None], args: tuple) -> None:
    fn(*args)


def run_jobs(fn: Callable[..., None], jobs: Sequence[tuple], outputs: Callable[[tuple], Iterable[Path]],
             overwrite: bool = False, nproc: int = 1, desc: str = "convert") -> tuple[int, int]:
    """Run ``fn(*job)`` for every job whose outputs are not all present (all jobs with ``overwrite``).

    Returns (converted, skipped). Output folders are created first; ``nproc`` > 1 uses a process pool.
    """
    todo = [job for job in jobs if overwrite or not all(p.is_file() for p in outputs(job))]
    for job in todo:
        for path in outputs(job):
            path.parent.mkdir(parents=True, exist_ok=True)
    work = partial(_star, fn)
    if nproc > 1 and len(todo) > 1:
        with multiprocessing.get_context("spawn").Pool(nproc) as pool:
            for _ in tqdm(pool.imap_unordered(work, todo, chunksize=8), total=len(todo), desc=desc, unit="file"):
                pass
    else:
        for job in tqdm(todo, desc=desc, unit="file"):
            work(job)
    return len(todo), len(jobs) - len(todo)


def build_parser() -> argparse.ArgumentParser:
    """The command line: one sub-command per converter."""
    parser = argparse.ArgumentParser(prog="python -m qd_core.data.convert",
                                     description="Convert published segmentation datasets to train-id labels.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--overwrite", action="store_true", help="rewrite outputs that already exist (default: skip)")
        p.add_argument("--nproc", type=int, default=1, help="worker processes (default: 1)")

    p = sub.add_parser("gta", help="GTA5 label ids → labels/*_labelTrainIds.png next to each source label")
    p.add_argument("root", type=Path, help="GTA5 root holding images/ and labels/")
    common(p)
    p = sub.add_parser("cityscapes", help="Cityscapes *_gtFine_polygons.json → *_gtFine_labelTrainIds.png")
    p.add_argument("root", type=Path, help="Cityscapes root holding leftImg8bit/ and gtFine/")
    common(p)
    p = sub.add_parser("mapillary", help="Mapillary Vistas labels → Cityscapes classes in OUT/{train,val}/label")
    p.add_argument("root", type=Path, help="Mapillary root holding config_<version>.json, training/, validation/")
    p.add_argument("out", type=Path, help="output root, e.g. ROOT/cityscapes_trainIdLabel")
    p.add_argument("--version", default="v1.2", help="dataset version naming the config and label folders")
    p.add_argument("--train_id", action="store_true",
                   help="write train ids 0..18 (what the readers expect); without it, Cityscapes label ids")
    common(p)
    p = sub.add_parser("mapillary-resize", help="halve Mapillary val images (bicubic) and labels (nearest)")
    p.add_argument("image_dir", type=Path, help="folder of *.jpg images, e.g. ROOT/validation/images")
    p.add_argument("label_dir", type=Path, help="folder of the matching *.png train-id labels")
    p.add_argument("out_image_dir", type=Path, help="output image folder, e.g. ROOT/half/val_img")
    p.add_argument("out_label_dir", type=Path, help="output label folder, e.g. ROOT/half/val_label")
    p.add_argument("--quality", type=int, default=75, help="JPEG quality of the halved images (Pillow default 75)")
    common(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.error(f"--nproc must be ≥ 1, got {args.nproc}")
    if args.command == "mapillary-resize" and not 1 <= args.quality <= 100:
        parser.error(f"--quality must be in 1..100, got {args.quality}")
    try:
        if args.command == "gta":
            done, skipped = run_jobs(convert_gta_label, gta_jobs(args.root), lambda j: [j[1]], args.overwrite,
                                     args.nproc, "gta")
        elif args.command == "cityscapes":
            done, skipped = run_jobs(convert_cityscapes_polygons, cityscapes_jobs(args.root), lambda j: [j[1]],
                                     args.overwrite, args.nproc, "cityscapes")
        elif args.command == "mapillary":
            lut, count = mapillary_lut(args.root / f"config_{args.version}.json", args.train_id)
            jobs = [(src, dst, lut, count) for src, dst in mapillary_jobs(args.root, args.out, args.version)]
            record_mapillary_encoding(args.out, args.train_id, args.version, args.overwrite)
            done, skipped = run_jobs(convert_mapillary_label, jobs, lambda j: [j[1]], args.overwrite, args.nproc,
                                     "mapillary")
        else:
            jobs = [(*j, args.quality) for j in resize_jobs(args.image_dir, args.label_dir, args.out_image_dir,
                                                            args.out_label_dir)]
            done, skipped = run_jobs(resize_half, jobs, lambda j: [j[2], j[3]], args.overwrite, args.nproc,
                                     "mapillary-resize")
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a read-only or full output folder: the path and the reason, not a traceback
        print(f"error: {err.filename}: {err.strerror or err}" if err.filename else f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.command}: converted {done}, skipped {skipped} existing (use --overwrite to redo)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
