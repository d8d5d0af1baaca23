"""Checkpoints: DINOv2 14→16 conversion (METHOD §2.2), safe loading, strict key reports, student save/load.

Loading never unpickles code: ``.safetensors`` files go through safetensors and anything else through
``torch.load(weights_only=True)``. Our own student checkpoints are a ``<stem>.safetensors`` weights file plus a
``<stem>.json`` beside it holding the config, both written atomically (temp file in the same folder, then
``os.replace``). The frozen DINOv2 weights are left out of a student checkpoint when the config names the
converted DINOv2 file they came from, and read back from that file on load; the file's SHA-256 is recorded, so a
student is never silently paired with other backbone weights than those its adapters were trained on.

Command line:

    python -m qd_core.checkpoint convert-dinov2 dinov2_vitl14_pretrain.pth dinov2_vitl16_512.safetensors \\
        --height 512 --width 512
"""
from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import math
import os
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qd_core.config import Config, ConfigError, apply_overrides, config_from_dict

PathLike = str | os.PathLike[str]

# The process's umask, read once at import (reading it means setting it, which is not thread-safe later on).
_UMASK = os.umask(0o022)
os.umask(_UMASK)

STUDENT_FORMAT = "querydiff-student"
STUDENT_VERSION = 1
# Student-meta key of the SHA-256 of the backbone file a student without frozen weights was trained with.
BACKBONE_HASH_KEY = "backbone_sha256"
# The id save_student writes into both the .safetensors metadata and the .json of one checkpoint.
PAIR_KEY = "pair_id"
POS_EMBED_KEY = "pos_embed"
PATCH_WEIGHT_KEY = "patch_embed.proj.weight"
# Keys under which training frameworks nest the actual state dict (mmengine/DINOv2 training checkpoints).
WRAPPER_KEYS = ("state_dict", "model", "teacher")
MAX_LISTED = 10


class CheckpointError(ValueError):
    """A checkpoint file or state dict that is missing, unreadable or does not fit the model."""


# --------------------------------------------------------------------------------------------------------------
# Key reports
# --------------------------------------------------------------------------------------------------------------


def _listing(keys: Iterable[str], limit: int = MAX_LISTED) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def state_dict_mismatch(expected: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> str:
    """One line naming the missing keys, unexpected keys and shape mismatches of ``state``; '' if it fits."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es): {_listing(shapes)}")
        width, model_width = (state[POS_EMBED_KEY].shape[-1], expected[POS_EMBED_KEY].shape[-1]) if (
            POS_EMBED_KEY in state and POS_EMBED_KEY in expected) else (None, None)
        if width is not None and width != model_width:
            # Another ViT size (ViT-B weights for a ViT-L config): no conversion fixes that.
            parts.append(f"its width is {width} but the model's is {model_width} (a ViT of another size: "
                         f"check model.backbone.embed_dim/depth/num_heads against the checkpoint)")
        elif any(s.startswith((POS_EMBED_KEY + " ", PATCH_WEIGHT_KEY + " ")) for s in shapes):
            parts.append("convert the DINOv2 checkpoint for this patch size and input size with "
                         "`python -m qd_core.checkpoint convert-dinov2 IN OUT --height H --width W`")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------------------------
# DINOv2 conversion
# --------------------------------------------------------------------------------------------------------------


def convert_dinov2(state: Mapping[str, Tensor], *, patch_size: int = 16, height: int = 512,
                   width: int = 512) -> dict[str, Tensor]:
    """Adapt an official DINOv2 state dict to another patch size and input size (METHOD §2.2).

    ``patch_embed.proj.weight`` (D, 3, k, k) is resized bicubically (align_corners=False) to
    (D, 3, patch_size, patch_size) without magnitude rescaling; the patch part of ``pos_embed`` (1, 1+g², D) is
    reshaped to its g×g grid, resized bicubically to (height/patch_size, width/patch_size) and re-joined to the
    unchanged CLS entry. Resampling runs in fp32; results keep the input dtype. Every other tensor is passed
    through unchanged (the same tensor objects).
    """
    for name, value in [("patch_size", patch_size), ("height", height), ("width", width)]:
        if value <= 0:
            raise ValueError(f"{name} = {value}: expected a positive integer")
    if height % patch_size or width % patch_size:
        raise ValueError(f"height x width = {height}x{width}: expected multiples of patch_size {patch_size}")
    for key in (PATCH_WEIGHT_KEY, POS_EMBED_KEY):
        if key not in state:
            raise CheckpointError(f"DINOv2 state dict has no '{key}' (keys: {_listing(state)})")
    out = dict(state)

    kernel = state[PATCH_WEIGHT_KEY]
    if kernel.dim() != 4 or kernel.shape[-1] != kernel.shape[-2]:
        raise CheckpointError(f"'{PATCH_WEIGHT_KEY}' has shape {tuple(kernel.shape)}: expected (D, C, k, k)")
    if kernel.shape[-1] != patch_size:
        out[PATCH_WEIGHT_KEY] = F.interpolate(kernel.float(), size=(patch_size, patch_size), mode="bicubic",
                                              align_corners=False).to(kernel.dtype)

    pos = state[POS_EMBED_KEY]
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[1] < 2:
        raise CheckpointError(f"'{POS_EMBED_KEY}' has shape {tuple(pos.shape)}: expected (1, 1 + g*g, D)")
    n, dim = pos.shape[1] - 1, pos.shape[2]
    g = math.isqrt(n)
    if g * g != n:
        raise CheckpointError(f"'{POS_EMBED_KEY}' has {n} patch positions (shape {tuple(pos.shape)}): expected a "
                              f"square grid g*g")
    grid_h, grid_w = height // patch_size, width // patch_size
    if (g, g) != (grid_h, grid_w):
        grid = pos[:, 1:].float().reshape(1, g, g, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patches = grid.flatten(2).transpose(1, 2)
        out[POS_EMBED_KEY] = torch.cat([pos[:, :1].float(), patches], dim=1).to(pos.dtype).contiguous()
    return out


# --------------------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------------------


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    while isinstance(obj, Mapping) and not all(isinstance(v, Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"checkpoint file '{path}': expected a non-empty state dict (name -> tensor), got "
                              f"{type(obj).__name__}{' (empty)' if isinstance(obj, Mapping) else ''}")
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise CheckpointError(f"checkpoint file '{path}': expected a state dict of tensors, but these entries are "
                              f"not tensors: {_listing(not_tensors)}")
    return {str(k): v for k, v in obj.items()}


def load_torch_file(path: PathLike) -> dict[str, Tensor]:
    """Read a state dict on the CPU from ``.safetensors`` or a torch file (``weights_only=True``).

    State dicts nested under a ``state_dict``, ``model`` or ``teacher`` key are unwrapped. A missing, unreadable
    or non-state-dict file raises CheckpointError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        problem = "is not a file" if path.exists() else "does not exist"
        raise CheckpointError(f"checkpoint file '{path}' {problem}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # each format raises its own family of errors for a damaged file
        raise CheckpointError(f"checkpoint file '{path}' could not be read as a PyTorch (.pth, .pt) or .safetensors "
                              f"state dict: {_first_line(e)}") from None
    return _unwrap(obj, path)


def load_backbone_checkpoint(backbone: nn.Module, path: PathLike) -> None:
    """Strictly load a (converted) DINOv2 checkpoint into ``backbone``.

    Raises CheckpointError listing missing and unexpected keys and shape mismatches before anything is copied.
    """
    state = load_torch_file(path)
    problem = state_dict_mismatch(backbone.state_dict(), state)
    if problem:
        raise CheckpointError(f"backbone checkpoint '{path}' does not fit the backbone: {problem}")
    backbone.load_state_dict(state, strict=True)


def file_sha256(path: PathLike) -> str:
    """Hex SHA-256 of a file's bytes (about a second per GB); cached per (path, inode, size, mtime) in this process, so
    a run that saves a student every few hundred steps hashes its DINOv2 file once."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return _sha256(str(resolved), stat.st_ino, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256(path: str, inode: int, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Writing files
# --------------------------------------------------------------------------------------------------------------


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temp file in the target folder, then rename: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # The mode a plain open() would give (safetensors creates its files 0600): checkpoints are shared.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def standalone_tensors(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous tensors that share no memory (safetensors refuses tied or strided tensors)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in state.items():
        t = value.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        out[key] = t
    return out


def save_state_file(state: Mapping[str, Tensor], path: PathLike, metadata: dict[str, str] | None = None) -> None:
    """Atomically write a state dict: safetensors for ``.safetensors``, ``torch.save`` otherwise."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        tensors = standalone_tensors(state)
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    else:
        atomic_write(path, lambda tmp: torch.save(dict(state), tmp))


# --------------------------------------------------------------------------------------------------------------
# Student checkpoints
# --------------------------------------------------------------------------------------------------------------


def student_paths(path: PathLike) -> tuple[Path, Path]:
    """(weights, config) paths of a student checkpoint named by its stem, its ``.safetensors`` or its ``.json``."""
    p = Path(path)
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    weights = p if p.suffix == ".safetensors" else p.with_name(p.name + ".safetensors")
    return weights, weights.with_suffix(".json")


def _backbone_prefix(model: nn.Module) -> str:
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"model: expected a `backbone` submodule, {type(model).__name__} has none")
    for name, module in model.named_modules():
        if module is backbone:
            return f"{name}."
    raise ValueError(f"model.backbone of {type(model).__name__} is not registered as a submodule")


def save_student(model: nn.Module, cfg: Config, path: PathLike, *, include_frozen: bool | None = None,
                 extra: dict[str, Any] | None = None, backbone_sha256: str | None = None) -> Path:
    """Write ``<path>.safetensors`` (the model's state dict) and ``<stem>.json`` (config and format); returns the
    weights path.

    include_frozen: store the ``backbone.*`` tensors too. ``None`` stores them only when
    ``cfg.model.backbone.checkpoint`` is empty, since a randomly initialised backbone could not be rebuilt.
    extra: more JSON-serialisable entries for the ``.json`` (e.g. step, metrics).
    backbone_sha256: the DINOv2 file's hash when the caller has it already (a trainer saving every few thousand
    steps); otherwise the file is hashed here.
    """
    weights_path, meta_path = student_paths(path)
    if include_frozen is None:
        include_frozen = not cfg.model.backbone.checkpoint
    state = model.state_dict()
    if not include_frozen:
        prefix = _backbone_prefix(model)
        trainable = [n for n, p in model.named_parameters() if n.startswith(prefix) and p.requires_grad]
        if trainable:
            raise ValueError(f"save_student(include_frozen=False) would drop trainable backbone parameters: "
                             f"{_listing(trainable)}")
        state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    # One id in both files: each is written atomically but separately, and an interruption between the two writes
    # would otherwise pair new weights with the old JSON (and its config) without a word.
    pair_id = uuid.uuid4().hex
    meta: dict[str, Any] = {"config": cfg.to_dict(), "format": STUDENT_FORMAT, "version": STUDENT_VERSION,
                            "include_frozen": bool(include_frozen), PAIR_KEY: pair_id}
    backbone_file = cfg.model.backbone.checkpoint
    if not include_frozen and backbone_file and Path(backbone_file).is_file():
        meta[BACKBONE_HASH_KEY] = backbone_sha256 or file_sha256(backbone_file)
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(meta))
    if clash:
        raise ValueError(f"extra: keys {clash} are reserved for the checkpoint format")
    meta.update(extra)
    try:
        text = json.dumps(meta, indent=2) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra: expected JSON-serialisable values ({e})") from None
    save_state_file(state, weights_path, metadata={"format": STUDENT_FORMAT, PAIR_KEY: pair_id})
    atomic_write(meta_path, lambda tmp: tmp.write_text(text))
    return weights_path


def read_student_meta(path: PathLike) -> dict[str, Any]:
    """The ``.json`` of a student checkpoint (named by stem, ``.safetensors`` or ``.json``), format-checked."""
    if Path(path).is_dir():
        raise CheckpointError(f"student checkpoint '{path}' is a folder: expected a .safetensors file (with its .json "
                              f"beside it), e.g. runs/tiny/best.safetensors")
    weights_path, meta_path = student_paths(path)
    if not meta_path.is_file():
        if not weights_path.is_file():  # nothing there at all: name what was asked for
            raise CheckpointError(f"student checkpoint '{weights_path}' does not exist")
        raise CheckpointError(f"student checkpoint config '{meta_path}' does not exist")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"student checkpoint config '{meta_path}' could not be read: {_first_line(e)}") from None
    if not isinstance(meta, dict) or meta.get("format") != STUDENT_FORMAT:
        raise CheckpointError(f"'{meta_path}': expected \"format\": \"{STUDENT_FORMAT}\"")
    if meta.get("version") != STUDENT_VERSION:
        raise CheckpointError(f"'{meta_path}': version {meta.get('version')!r}, expected {STUDENT_VERSION}")
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"'{meta_path}': expected a \"config\" mapping")
    return meta


def _check_pair(weights_path: Path, meta_path: Path) -> None:
    """The .safetensors and the .json must come from one save_student call (checkpoints written before the id
    existed carry none and are not judged)."""
    if weights_path.suffix != ".safetensors" or not meta_path.is_file():
        return
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights_path), framework="pt") as f:
            weights_id = (f.metadata() or {}).get(PAIR_KEY)
        meta_id = json.loads(meta_path.read_text()).get(PAIR_KEY)
    except (OSError, ValueError, AttributeError, SafetensorError):
        return  # unreadable files are reported by their own readers
    if weights_id and meta_id and weights_id != meta_id:
        raise CheckpointError(f"student checkpoint '{weights_path}' and '{meta_path}' come from different saves "
                              f"(one was interrupted between writing the two): save the student again, or use "
                              f"another checkpoint")


def load_student_weights(model: nn.Module, path: PathLike, *, backbone_checkpoint: PathLike | None = None) -> None:
    """Load a student ``.safetensors`` into ``model`` (which has a ``backbone`` submodule).

    When the file holds no ``backbone.*`` tensors, the backbone is loaded from ``backbone_checkpoint``, or, if
    that is None, from ``model.backbone.checkpoint`` of the config beside the file; a backbone file whose SHA-256
    differs from the one recorded at save time raises CheckpointError. Any other missing, unexpected or
    mis-shaped key raises CheckpointError listing them.
    """
    weights_path, meta_path = student_paths(path)
    state = load_torch_file(weights_path)
    _check_pair(weights_path, meta_path)
    prefix = _backbone_prefix(model)
    expected = model.state_dict()
    backbone_keys = {k for k in expected if k.startswith(prefix)}
    if backbone_keys and not any(k.startswith(prefix) for k in state):
        meta = read_student_meta(weights_path)
        if backbone_checkpoint is None:
            backbone_checkpoint = config_from_dict(meta["config"]).model.backbone.checkpoint
        if not backbone_checkpoint:
            raise CheckpointError(f"student weights '{weights_path}' hold no '{prefix}*' tensors and no backbone "
                                  f"checkpoint is given (model.backbone.checkpoint is empty)")
        _check_backbone_file(Path(backbone_checkpoint), meta.get(BACKBONE_HASH_KEY), weights_path)
        load_backbone_checkpoint(model.backbone, backbone_checkpoint)
        expected = {k: v for k, v in expected.items() if k not in backbone_keys}
    state = with_zero_biases_added(expected, state)
    problem = state_dict_mismatch(expected, state)
    if problem:
        raise CheckpointError(f"student weights '{weights_path}' do not fit the model: {problem}")
    model.load_state_dict(state, strict=False)


# Tensors the student gained after checkpoints without them were written, each of which computes exactly what its
# absence did when zero: the pixel decoder's input-projection biases (mmdet builds those convs with a bias).
_ZERO_IF_ABSENT = ("pixel_decoder.input_convs.", ".conv.bias")


def with_zero_biases_added(expected: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` plus zeros for each ``_ZERO_IF_ABSENT`` key of ``expected`` it lacks, so that a student saved
    before those tensors existed loads and predicts as it did."""
    start, end = _ZERO_IF_ABSENT
    out = dict(state)
    for key, value in expected.items():
        if key not in out and key.startswith(start) and key.endswith(end):
            out[key] = torch.zeros_like(value, device="cpu")
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def model_config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, a's value, b's value) for every ``model.*`` key on which two config dicts disagree, ignoring the
    path of the DINOv2 file (the same weights may live anywhere)."""
    fa, fb = _flatten({"model": a.get("model", {})}), _flatten({"model": b.get("model", {})})
    ignored = {"model.backbone.checkpoint"}
    # Backbone keys first: they are what usually tells two configs apart (width, depth).
    keys = sorted(set(fa) | set(fb), key=lambda k: (not k.startswith("model.backbone."), k))
    return [(k, fa.get(k), fb.get(k)) for k in keys if k not in ignored and fa.get(k) != fb.get(k)]


def _check_backbone_file(path: Path, recorded: str | None, student: Path) -> None:
    """The backbone file must be the one the student was trained with (when its hash was recorded)."""
    if recorded is None or not path.is_file():  # older checkpoints; a missing file is reported by the loader
        return
    actual = file_sha256(path)
    if actual != recorded:
        raise CheckpointError(
            f"backbone checkpoint '{path}' has SHA-256 {actual[:16]}…, but student '{student}' was trained on a "
            f"backbone with {recorded[:16]}…: its adapters and head expect those weights; point "
            f"model.backbone.checkpoint at that file (or retrain)")


def load_student(path: PathLike, overrides: Sequence[str] = (), *,
                 device: str | torch.device = "cpu") -> tuple[nn.Module, Config]:
    """Rebuild a student from ``save_student`` output: config from the ``.json`` (+ dotted overrides), model from
    ``qd_core.model.build_student``, weights from the ``.safetensors``. Returns (model in eval mode, config)."""
    weights_path, meta_path = student_paths(path)
    meta = read_student_meta(meta_path)
    try:
        cfg = config_from_dict(apply_overrides(meta["config"], overrides))
    except ConfigError as e:
        raise ConfigError(f"{meta_path}: {e}") from None
    # Overrides that keep every weight's shape (heads, norm eps, ...) would load cleanly and compute something
    # else: the model is the one the weights were trained as. Only where its DINOv2 file lives may change.
    diffs = model_config_differences(meta["config"], cfg.to_dict())
    if diffs:
        shown = "; ".join(f"{k} = {va!r} (checkpoint) vs {vb!r}" for k, va, vb in diffs[:4])
        raise ConfigError(f"{meta_path}: overrides may not change the model the weights were trained as ({shown}); "
                          f"only model.backbone.checkpoint may point elsewhere")
    from qd_core.model import build_student  # late: the model module imports far more than checkpoint needs

    # Build without the DINOv2 file: load_student_weights reads it only if the student file lacks the backbone,
    # so a large backbone is never read twice.
    build_cfg = copy.deepcopy(cfg)
    build_cfg.model.backbone.checkpoint = ""
    model = build_student(build_cfg)
    load_student_weights(model, weights_path, backbone_checkpoint=cfg.model.backbone.checkpoint)
    return model.to(device).eval(), cfg


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qd_core.checkpoint", description="QueryDiff checkpoint tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    convert = commands.add_parser(
        "convert-dinov2", help="resize an official DINOv2 checkpoint's patch kernel and position grid",
        description="Convert an official DINOv2 checkpoint (patch 14, 37x37 position grid) to another patch size "
                    "and input size: bicubic resize of patch_embed.proj.weight and of the position grid.")
    convert.add_argument("input", metavar="IN", nargs="?", help="official DINOv2 checkpoint, e.g. "
                         "dinov2_vitl14_pretrain.pth (.pth/.pt read with weights_only=True, or .safetensors)")
    convert.add_argument("output", metavar="OUT", nargs="?", help="converted checkpoint to write: .safetensors, or a "
                                                                  "torch file for any other suffix")
    # The reference tool's spelling (METHOD §2.2), so its documented command works unchanged.
    convert.add_argument("--pretrained", metavar="IN", default=None, help="IN given as a flag")
    convert.add_argument("--converted", metavar="OUT", default=None, help="OUT given as a flag")
    convert.add_argument("--height", type=int, default=512, help="input height the position grid is made for "
                                                                 "(grid rows = height / kernel; default 512)")
    convert.add_argument("--width", type=int, default=512, help="input width the position grid is made for "
                                                                "(grid columns = width / kernel; default 512)")
    convert.add_argument("--kernel", type=int, default=16, help="new patch size of patch_embed.proj (default 16)")
    convert.add_argument("--overwrite", action="store_true", help="replace OUT if it already exists")
    return parser


def dinov2_backbone_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The ViT of a DINOv2 state dict. A DINOv2 *training* checkpoint's ``teacher`` (or ``student``) dict holds it
    under ``backbone.`` beside the ``dino_head``/``ibot_head`` projection heads: those are dropped and the prefix
    removed, as DINOv2's own loader does. A released ``dinov2_vit*_pretrain.pth`` is returned as it is."""
    if PATCH_WEIGHT_KEY in state or f"backbone.{PATCH_WEIGHT_KEY}" not in state:
        return dict(state)
    return {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}


def _convert_command(args: argparse.Namespace) -> None:
    # The flags are checked under their own names before the (large) input is read.
    for flag in ("kernel", "height", "width"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} {getattr(args, flag)}: expected a positive integer")
    if args.height % args.kernel or args.width % args.kernel:
        raise ValueError(f"--height {args.height} --width {args.width}: expected multiples of --kernel {args.kernel}")
    if args.height != args.width:
        # The backbone holds a square position grid (model.backbone.pos_grid_size) and resizes it per input.
        raise ValueError(f"--height {args.height} --width {args.width}: expected one square size, the config's "
                         f"model.backbone.pos_grid_size (512 for vitl16_512, 1024 for vitl16_1024)")
    out = Path(args.output)
    if out.is_dir():
        raise CheckpointError(f"'{out}' is a folder: expected the path of the .safetensors file to write")
    if out.exists() and not args.overwrite:
        raise CheckpointError(f"'{out}' already exists: pass --overwrite to replace it")
    state = dinov2_backbone_state(load_torch_file(args.input))
    try:
        converted = convert_dinov2(state, patch_size=args.kernel, height=args.height, width=args.width)
    except CheckpointError as e:
        raise CheckpointError(f"'{args.input}': {e} (expected an official DINOv2 ViT checkpoint, e.g. "
                              f"dinov2_vitl14_pretrain.pth)") from None
    save_state_file(converted, out)
    changed = [k for k in converted if converted[k] is not state[k]]
    print(f"converted '{args.input}' -> '{out}' (patch {args.kernel}, input {args.height}x{args.width})")
    for k in changed:
        print(f"  {k}: {tuple(state[k].shape)} -> {tuple(converted[k].shape)}")
    print(f"  {len(converted) - len(changed)} other tensors unchanged")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, metavar, flag in (("input", "IN", "pretrained"), ("output", "OUT", "converted")):
        given = [v for v in (getattr(args, name), getattr(args, flag)) if v is not None]
        if len(given) != 1:
            parser.error(f"{metavar}: expected it once, as an argument or as --{flag}; got it {len(given)} times")
        setattr(args, name, given[0])
    try:
        _convert_command(args)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only folder, a full disk, a file where a folder should be
        print(f"error: cannot write '{args.output}': {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
