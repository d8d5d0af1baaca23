"""Per-dataset mIoU of a student (METHOD §8.3), colour-coded predictions, and the evaluation command line.

    python -m train.evaluate --checkpoint runs/tiny/best.safetensors
    python -m train.evaluate --checkpoint C --data cityscapes:/data/cityscapes --data acdc:/data/acdc:val \\
        [--mode whole|slide] [--show-dir DIR] [--config F] [key=value ...]
    python -m train.evaluate --checkpoint C --data acdc:/data/acdc:test --format-only DIR [--format-ids label|train]

Images are resized for testing per ``DatasetSpec.test_size`` (keep ratio, fit into (long, short)); the logits
are resized back bilinearly to the label's resolution before the argmax, so every dataset is scored at its
original resolution. Under torchrun each rank scores every world_size-th image and the confusion matrices are
summed over ranks.

``--format-only`` scores nothing and reads no label: it writes each image's prediction at the image's resolution
as a PNG of Cityscapes label ids, for a benchmark server that keeps its test labels (the Cityscapes and ACDC test
sets; QueryDiff's 1024 configuration reports ACDC test this way, METHOD §8.1), and zips them.
"""
from __future__ import annotations

import argparse
import math
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from qd_core.config import Config, DatasetSpec
from qd_core.data.files import refuse_non_empty_dir
from qd_core.layers import class_argmax
from qd_core.metrics import ConfusionMatrix
from qd_core.visualize import colorize, overlay, save_png
from train.data import (
    DataError,
    SafeDataset,
    build_dataset,
    check_batch,
    collate_safe,
    default_test_size,
    eval_transform,
    is_target,
    parse_data_arg,
    val_specs,
)
from train.distributed import DistEnv, any_rank, barrier

# --format-ids: what each PNG of --format-only holds.
FORMAT_IDS = ("label", "train")


@dataclass
class DatasetScore:
    """The confusion matrix of one evaluated dataset and whether it is a target (unseen) domain."""

    name: str
    matrix: ConfusionMatrix
    target: bool
    images: int

    @property
    def miou(self) -> float:
        """mIoU in percent (NaN when nothing was scored)."""
        return 100.0 * self.matrix.miou()


@dataclass
class Prediction:
    """One predicted image: its files, the label map (H, W) at the label's (or image's) resolution, the label."""

    image_path: str
    label_path: str | None
    pred: np.ndarray
    label: np.ndarray | None


def _image_size(path: str) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.height, img.width


def predict_dataset(model: nn.Module, dataset: Any, *, device: torch.device, mode: str | None,
                    batch_size: int = 1, num_workers: int = 0, indices: Sequence[int] | None = None,
                    progress: bool = False, desc: str = "",
                    on_error: Callable[[str], None] | None = None) -> Iterator[Prediction]:
    """Predict every image (or ``indices``) of a dataset whose transform gives normalised (3, h, w) images.

    ``model`` is a student in eval mode with ``predict_logits(images (B, 3, h, w), mode) → (B, K, h, w)``.
    Predictions are resized to the label's resolution, or to the original image size without labels. A file that
    cannot be loaded raises a DataError naming it, or with ``on_error`` is handed to it and its batch skipped.
    """
    subset = Subset(SafeDataset(dataset), list(indices) if indices is not None else range(len(dataset)))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_safe)
    with tqdm(total=len(subset), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for batch in loader:
            if on_error is not None and "error" in batch:
                on_error(batch["error"])
                bar.update(min(batch_size, bar.total - bar.n))  # the batch's images, all skipped with it
                continue
            batch = check_batch(batch)
            images = batch["image"]
            labels = batch.get("label")
            paths, label_paths = batch["path"], batch.get("label_path")
            groups: list[tuple[Tensor, list[int]]]
            if isinstance(images, Tensor):
                groups = [(images, list(range(len(paths))))]
            else:  # differently sized images: one at a time
                groups = [(img[None], [i]) for i, img in enumerate(images)]
            for group, members in groups:
                logits = model.predict_logits(group.to(device), mode)
                for row, i in enumerate(members):
                    label = None if labels is None else labels[i]
                    size = tuple(label.shape[-2:]) if label is not None else _image_size(paths[i])
                    scored = F.interpolate(logits[row:row + 1].float(), size=size, mode="bilinear",
                                           align_corners=False)
                    pred = class_argmax(scored)[0].to(torch.uint8).cpu().numpy()
                    yield Prediction(paths[i], None if label_paths is None else label_paths[i], pred,
                                     None if label is None else label.cpu().numpy())
                    bar.update()


def output_name(image_path: str, root: str | Path | None) -> str:
    """A file-name stem for an image's outputs: its path below ``root`` with folders joined by "__"."""
    p = Path(image_path)
    try:
        rel = p.relative_to(root) if root else Path(p.name)
    except ValueError:
        rel = Path(p.name)
    return "__".join(rel.with_suffix("").parts)


def save_visuals(pred: Prediction, out_dir: Path, name: str, alpha: float = 0.5) -> None:
    """Write ``<name>_pred.png`` (colour-coded classes) and ``<name>_overlay.png`` (over the input image)."""
    from qd_core.data.files import read_image

    image = read_image(pred.image_path)
    if image.shape[:2] != pred.pred.shape:
        image = np.asarray(Image.fromarray(image).resize(pred.pred.shape[::-1], Image.BILINEAR))
    save_png(colorize(pred.pred), out_dir / f"{name}_pred.png")
    save_png(overlay(image, pred.pred, alpha), out_dir / f"{name}_overlay.png")


def evaluate(model: nn.Module, specs: Sequence[DatasetSpec], cfg: Config, *, env: DistEnv | None = None,
             mode: str | None = None, batch_size: int = 1, num_workers: int = 0, show_dir: Path | None = None,
             progress: bool = False, train_cfg: Config | None = None) -> list[DatasetScore]:
    """Score ``model`` (a student) on each dataset spec; returns one ``DatasetScore`` per spec, reduced over ranks.

    ``cfg`` supplies the data roots (synthetic) and the normalisation; ``train_cfg`` (default ``cfg``) the data the
    model was trained on, which is a source, not a target, in the target mean.
    """
    env = env or DistEnv(device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    scores = []
    try:
        for spec in specs:
            dataset = build_dataset(spec, cfg, eval_transform(spec, cfg))
            name = spec.display_name()
            matrix = ConfusionMatrix(cfg.model.head.num_classes)
            shard = range(env.rank, len(dataset), env.world_size)
            root = spec.root or None
            error = None
            try:
                for pred in predict_dataset(model, dataset, device=env.device, mode=mode, batch_size=batch_size,
                                            num_workers=num_workers, indices=shard,
                                            progress=progress and env.is_main, desc=name):
                    if pred.label is not None:
                        matrix.update(torch.from_numpy(pred.pred.astype(np.int64)), torch.from_numpy(pred.label))
                    if show_dir is not None:
                        save_visuals(pred, show_dir / name.replace("/", "_"), output_name(pred.image_path, root))
            except DataError as err:
                error = str(err)
            # A file only one rank reads fails on that rank alone: every rank must stop here together, or the
            # others would wait for it in the all-reduce below.
            if any_rank([error is not None], env)[0]:
                raise DataError(error or f"{name}: another rank could not load its validation data (see its error)")
            matrix.all_reduce()
            scores.append(DatasetScore(name, matrix, is_target(spec, cfg, train_cfg=train_cfg), len(dataset)))
    finally:
        model.train(was_training)
    return scores


def format_predictions(model: nn.Module, specs: Sequence[DatasetSpec], cfg: Config, out_dir: Path, *,
                       ids: str = "label", env: DistEnv | None = None, mode: str | None = None, batch_size: int = 1,
                       num_workers: int = 0, show_dir: Path | None = None, progress: bool = False) -> int:
    """Predict every image of ``specs`` without reading labels and write ``out_dir/<image file stem>.png`` for each:
    uint8 at the image's resolution, Cityscapes label ids (``ids="label"``, what the Cityscapes and ACDC servers
    score; train ids 0..18 with ``ids="train"``). One flat folder, as mmsegmentation's ``format_only`` writes it
    and the servers take it: file stems must be unique over all specs, checked before anything is predicted.
    Rank 0 then zips the folder's PNGs into ``out_dir/submission.zip`` (written whole, then renamed). Returns the
    number of images."""
    from qd_core.data.labels import train_id_to_label_id_lut

    if ids not in FORMAT_IDS:
        raise ValueError(f"--format-ids {ids!r}: expected one of {', '.join(FORMAT_IDS)}")
    env = env or DistEnv(device=next(model.parameters()).device)
    datasets = [(spec, build_dataset(spec, cfg, eval_transform(spec, cfg), labels=False)) for spec in specs]
    seen: dict[str, Path] = {}
    for _, dataset in datasets:
        for sample in dataset.samples:
            stem = sample.image.stem
            if stem in seen:
                raise ValueError(f"{sample.image}: its prediction would overwrite that of {seen[stem]} (same file "
                                 f"name in one --format-only folder); format the two datasets into separate folders")
            seen[stem] = sample.image
    lut = train_id_to_label_id_lut() if ids == "label" else None
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        for spec, dataset in datasets:
            name = spec.display_name()
            for pred in predict_dataset(model, dataset, device=env.device, mode=mode, batch_size=batch_size,
                                        num_workers=num_workers, indices=range(env.rank, len(dataset), env.world_size),
                                        progress=progress and env.is_main, desc=name):
                save_png(pred.pred if lut is None else lut[pred.pred], out_dir / f"{Path(pred.image_path).stem}.png")
                if show_dir is not None:
                    save_visuals(pred, show_dir / name.replace("/", "_"),
                                 output_name(pred.image_path, spec.root or None))
    finally:
        model.train(was_training)
    barrier(env)
    if env.is_main:
        from qd_core.checkpoint import atomic_write

        def write_zip(tmp: Path) -> None:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:  # PNGs are compressed already
                for stem in sorted(seen):
                    zf.write(out_dir / f"{stem}.png", arcname=f"{stem}.png")

        atomic_write(out_dir / "submission.zip", write_zip)
    return len(seen)


def target_mean(scores: Sequence[DatasetScore]) -> float:
    """Mean mIoU (percent) over the target datasets; NaN without targets."""
    values = [s.miou for s in scores if s.target and not math.isnan(s.miou)]
    return float(np.mean(values)) if values else float("nan")


def overall_mean(scores: Sequence[DatasetScore]) -> float:
    """Mean mIoU (percent) over every evaluated dataset (the "best" checkpoint criterion)."""
    values = [s.miou for s in scores if not math.isnan(s.miou)]
    return float(np.mean(values)) if values else float("nan")


def miou_table(scores: Sequence[DatasetScore]) -> str:
    """One line per dataset (mIoU in %, targets marked), then the mean over the target datasets."""
    width = max([len("mean over targets")] + [len(s.name) for s in scores])
    lines = [f"{'dataset':<{width}}  {'mIoU':>6}  domain"]
    for s in scores:
        score = f"{s.miou:6.2f}" if not math.isnan(s.miou) else f"{'n/a':>6}"
        lines.append(f"{s.name:<{width}}  {score}  {'target' if s.target else 'source'}")
    if any(s.target for s in scores):
        lines.append(f"{'mean over targets':<{width}}  {target_mean(scores):6.2f}")
    unscored = [s.name for s in scores if math.isnan(s.miou)]
    if unscored:
        lines.append(f"n/a: no labelled pixel was scored in {', '.join(unscored)} (left out of the means)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.evaluate",
                                description="Per-dataset mIoU and per-class IoU of a student checkpoint.")
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="student checkpoint (.safetensors with its .json beside it), e.g. runs/tiny/best.safetensors")
    p.add_argument("--config", default=None,
                   help="take the datasets (data.val) and data roots from this config (name or YAML) instead of the "
                        "checkpoint's own config")
    p.add_argument("--data", action="append", default=[], metavar="KIND[/DOMAIN]:ROOT[:SPLIT]",
                   help="a dataset to score (repeatable), e.g. cityscapes:/data/cityscapes, acdc/fog:/data/acdc:val; "
                        "without a domain, synthetic means all 7 domains and acdc its 4 conditions")
    p.add_argument("--mode", choices=["whole", "slide"], default=None,
                   help="inference mode (default: the config's inference.mode)")
    p.add_argument("--show-dir", type=Path, default=None,
                   help="write colour-coded predictions and overlays here, one folder per dataset")
    p.add_argument("--format-only", type=Path, default=None, metavar="DIR",
                   help="score nothing and read no labels: write each image's prediction as DIR/<image name>.png at "
                        "the image's resolution, and DIR/submission.zip of them, for a benchmark server's test set "
                        "(e.g. --data acdc:/data/acdc:test)")
    p.add_argument("--format-ids", choices=FORMAT_IDS, default="label",
                   help="what the --format-only PNGs hold: Cityscapes label ids (default; what the Cityscapes and ACDC "
                        "servers score) or train ids 0..18")
    p.add_argument("--overwrite", action="store_true",
                   help="allow writing into a non-empty --show-dir or --format-only folder")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass (default 1)")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default: data.num_workers)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of the checkpoint's config, e.g. inference.stride=[256,256]")
    return p


def check_output_dir(path: Path, overwrite: bool, flag: str) -> None:
    """Refuse a non-empty output folder unless ``overwrite`` (nothing is replaced silently), then create it."""
    refuse_non_empty_dir(path, overwrite, flag)
    path.mkdir(parents=True, exist_ok=True)


def resolve_specs(args: argparse.Namespace, model_cfg: Config) -> tuple[list[DatasetSpec], Config]:
    """The datasets to score and the config that supplies their roots."""
    from qd_core.config import load_config

    data_cfg = load_config(args.config) if args.config else model_cfg
    if args.data:
        specs = []
        for text in args.data:
            for spec in parse_data_arg(text):
                spec.test_size = default_test_size(spec.kind, model_cfg.inference.window)
                specs.append(spec)
    else:
        specs = val_specs(data_cfg)
    if not specs:
        raise ValueError("no datasets to evaluate: pass --data KIND:ROOT[:SPLIT] or a --config with data.val")
    unlabelled = [s for s in specs if s.kind == "folder"]
    if unlabelled and not (args.format_only or args.show_dir):
        raise ValueError(f"--data folder:{unlabelled[0].root}: a folder of images has no labels to score; write "
                         f"its predictions with --format-only DIR or --show-dir DIR, or use python -m train.visualize")
    return specs, data_cfg


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from qd_core.checkpoint import load_student
    from train.distributed import init_distributed, main_first, shutdown_distributed

    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size}: expected a positive integer")
        if args.num_workers is not None and args.num_workers < 0:
            raise ValueError(f"--num-workers {args.num_workers}: expected 0 (load in this process) or more")
        env = init_distributed(args.device)
        model, cfg = load_student(args.checkpoint, args.overrides, device=env.device)
        specs, data_cfg = resolve_specs(args, cfg)
        if args.show_dir is not None:
            main_first(env, lambda: check_output_dir(args.show_dir, args.overwrite, "--show-dir"))
        workers = data_cfg.data.num_workers if args.num_workers is None else args.num_workers
        if args.format_only is not None:
            main_first(env, lambda: check_output_dir(args.format_only, args.overwrite, "--format-only"))
            count = format_predictions(model, specs, data_cfg, args.format_only, ids=args.format_ids, env=env,
                                       mode=args.mode, batch_size=args.batch_size, num_workers=workers,
                                       show_dir=args.show_dir, progress=not args.no_progress)
            if env.is_main:
                kind = "Cityscapes label ids" if args.format_ids == "label" else "train ids"
                print(f"wrote {count} predictions ({kind}) to {args.format_only} and "
                      f"{args.format_only / 'submission.zip'}")
            return 0
        scores = evaluate(model, specs, data_cfg, env=env, mode=args.mode, batch_size=args.batch_size,
                          num_workers=workers, show_dir=args.show_dir, progress=not args.no_progress,
                          train_cfg=cfg)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    if env.is_main:
        for s in scores:
            print(f"\n{s.name} ({s.images} images)")
            print(s.matrix.per_class_table())
        print()
        print(miou_table(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
