"""Image and label file I/O with one clear error per bad file, and atomic writes (temp file, then rename)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

ORIENTATION_TAG = 0x0112  # EXIF Orientation

# PNG label modes that store one class index per pixel ("P" keeps the index, not the palette colour).
_LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 (H, W, 3); grey, palette and alpha images are converted to RGB, 16-bit
    samples keep their high byte, and a JPEG stored sideways is turned upright by its EXIF orientation (as
    OpenCV's reader, and so mmseg's pipeline, turns it; label files are never turned)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    try:
        with Image.open(path) as img:
            if img.format in ("JPEG", "MPO") and img.getexif().get(ORIENTATION_TAG, 1) != 1:
                img = ImageOps.exif_transpose(img)
            if img.mode.startswith("I;16"):
                # 16-bit grey: Pillow's convert("RGB") clips the values to 255 (mid-grey 32896 turns white); take
                # the high byte, as Pillow itself reads 16-bit RGB and as the C++ runner reads every 16-bit PNG.
                grey = (np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as err:
        raise ValueError(f"{path}: unreadable image ({err})") from None


def read_label(path: str | Path) -> np.ndarray:
    """Read a single-channel label PNG as (H, W) integers (uint8, or int32 for 16-bit files)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: label file not found")
    try:
        with Image.open(path) as img:
            mode = img.mode
            if mode not in _LABEL_MODES:
                raise ValueError(f"{path}: label image has mode {mode!r}; expected a single-channel class-index "
                                 f"PNG (one of {', '.join(_LABEL_MODES)}), not a colour rendering")
            label = np.asarray(img)
    except ValueError:
        raise
    except (OSError, SyntaxError) as err:
        raise ValueError(f"{path}: unreadable label ({err})") from None
    return label if label.dtype == np.uint8 else label.astype(np.int32)


def is_hidden(path: Path) -> bool:
    """Dot-files: among them the temporary siblings an atomic write leaves behind when its process is killed
    (``.<stem>.tmp<pid><suffix>``); dataset readers and converters never take them for data."""
    return path.name.startswith(".")


def _temp_sibling(path: Path) -> Path:
    # Same folder (so the rename is atomic on one file system) and same suffix (so Pillow picks the format).
    return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


def save_image_atomic(image: Image.Image, path: str | Path, **save_kwargs: object) -> None:
    """Save a Pillow image to ``path`` via a temporary sibling file renamed into place."""
    path = Path(path)
    tmp = _temp_sibling(path)
    try:
        image.save(tmp, **save_kwargs)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_label_atomic(label: np.ndarray, path: str | Path) -> None:
    """Save a (H, W) label with values in 0..255 as an 8-bit single-channel PNG, atomically."""
    if label.ndim != 2:
        raise ValueError(f"label for {path} must be (H, W), got shape {tuple(label.shape)}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"label for {path} holds values outside 0..255 (min {label.min()}, max {label.max()})")
    save_image_atomic(Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8)), path)


def write_dir(out: Path, write: Callable[[Path], None]) -> None:
    """Build a folder with ``write(tmp)`` (``tmp``: a fresh path beside ``out``, not yet created) and move it to
    ``out`` once complete (``replace_dir``): readers see the old folder, or the whole new one, never a partial one."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` to ``dst``, replacing an existing ``dst`` only after ``src`` is complete."""
    if dst.exists():
        trash = dst.with_name(f".{dst.name}.old{os.getpid()}")
        os.replace(dst, trash)
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dst)


def refuse_non_empty_dir(path: Path, overwrite: bool, flag: str) -> None:
    """ValueError unless ``path`` is missing, an empty folder, or a folder the user allowed with ``--overwrite``
    (nothing in an output folder is replaced silently). Creates nothing."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} '{path}' exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"{flag} '{path}' is not empty: pass --overwrite to write into it")
