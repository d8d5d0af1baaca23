"""A tiny ViT pretrained on the synthetic source scenes, standing in for DINOv2 in the CPU default run.

    python -m train backbone [--config tiny] [--out DIR] [--data DIR] [--steps N] [--seed S] [--overwrite]

QueryDiff freezes a DINOv2 backbone whose features already separate objects and stuff; the student only adapts
them (LoRA-Reins) and decodes them. The embedded default cannot download DINOv2, and a frozen *random* ViT gives
the head nothing to adapt: its tokens are random projections of 16×16 patches. So, like the tiny diffusion
teacher, the default makes its own small stand-in once: the config's ViT (``model.backbone``) is trained on the
synthetic **source** train split with a linear read-out of every block's patch tokens, upsampled to the crop,
under per-pixel cross-entropy, then saved in DINOv2's parameter names and loaded frozen like a DINOv2 checkpoint
(``model.backbone.checkpoint``). It never sees a target domain, so the domain-generalisation scores stay honest;
unlike DINOv2 it was trained with the source labels, which the README says next to the numbers.

The folder holds ``backbone.safetensors``, ``backbone.json`` (settings, loss curve, time) and README.txt.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from qd_core.backbone import DinoVisionTransformer
from qd_core.config import BackboneConfig, Config, ConfigError, DatasetSpec, load_config
from qd_core.data import collate
from qd_core.data.files import write_dir
from qd_core.layers import class_argmax
from train.data import synthetic_root

DEFAULT_STEPS = 400
DEFAULT_BATCH_SIZE = 16
DEFAULT_LR = 1e-3
WEIGHTS_FILE = "backbone.safetensors"
INFO_FILE = "backbone.json"


def folder_name(b: BackboneConfig) -> str:
    """One folder per architecture, so a changed ``model.backbone`` never picks up weights of another shape."""
    return f"backbone-synthetic-p{b.patch_size}-d{b.embed_dim}-l{b.depth}-h{b.num_heads}-g{b.pos_grid_size}"


def architecture(b: BackboneConfig) -> dict[str, Any]:
    """Everything of ``model.backbone`` that the weights depend on (shapes, or what training made of them)."""
    return {"patch_size": b.patch_size, "embed_dim": b.embed_dim, "depth": b.depth, "num_heads": b.num_heads,
            "mlp_ratio": b.mlp_ratio, "pos_grid_size": b.pos_grid_size, "layerscale_init": b.layerscale_init,
            "layer_norm_eps": b.layer_norm_eps}


class PatchReadout(nn.Module):
    """Per-block linear maps from patch tokens to class logits, summed: every block's tokens are pushed toward
    the classes (the student reads the pyramid taps and the agent queries read every layer)."""

    def __init__(self, depth: int, dim: int, num_classes: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(depth))

    def forward(self, layers: Sequence[Tensor], grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
        """layers: each (B, h*w, D) → logits (B, K, H, W), bilinearly upsampled from the (h, w) token grid."""
        logits = sum(head(tokens) for head, tokens in zip(self.heads, layers))
        b, _, k = logits.shape
        logits = logits.transpose(1, 2).reshape(b, k, *grid)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def pretrain(cfg: Config, train_spec: DatasetSpec, *, steps: int, batch_size: int, lr: float, seed: int,
             progress: bool) -> tuple[DinoVisionTransformer, list[float], list[float]]:
    """Train ``cfg.model.backbone`` on ``train_spec`` with the config's augmentation. Returns the backbone (frozen
    again, eval mode), the loss and the pixel accuracy of every step."""
    from train.data import build_dataset
    from train.trainer import train_transform

    torch.manual_seed(seed)
    backbone = DinoVisionTransformer(cfg.model.backbone)
    backbone.requires_grad_(True)
    readout = PatchReadout(len(backbone.blocks), backbone.embed_dim, cfg.model.head.num_classes)
    dataset = build_dataset(train_spec, cfg, train_transform(cfg), seed=seed)
    dataset.keep_decoded(cfg.data.keep_decoded)
    params = [p for p in [*backbone.parameters(), *readout.parameters()] if p is not backbone.mask_token]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (1 - s / steps) ** 0.9)
    generator = torch.Generator().manual_seed(seed)
    losses, accuracies = [], []
    bar = tqdm(range(steps), desc="tiny backbone", disable=not progress, leave=False)
    for step in bar:
        dataset.set_epoch(step)  # fresh augmentation draws for every step
        ids = torch.randint(len(dataset), (batch_size,), generator=generator).tolist()
        batch = collate([dataset[i] for i in ids])
        images, labels = batch["image"], batch["label"]
        out = backbone(images)
        logits = readout(out.layers, out.grid, tuple(labels.shape[-2:]))
        loss = F.cross_entropy(logits, labels, ignore_index=255)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            valid = labels != 255
            accuracy = float(((class_argmax(logits) == labels) & valid).sum() / valid.sum().clamp(min=1))
        losses.append(loss.item())
        accuracies.append(accuracy)
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy:.2f}")
    backbone.requires_grad_(False)
    return backbone, losses, accuracies


def _mean(values: Sequence[float], first: bool, window: int = 20) -> float:
    part = values[:window] if first else values[-window:]
    return round(sum(part) / max(1, len(part)), 4)


def make_tiny_backbone(cfg: Config, out: Path, train_spec: DatasetSpec, *, steps: int = DEFAULT_STEPS,
                       batch_size: int = DEFAULT_BATCH_SIZE, lr: float = DEFAULT_LR, seed: int = 0,
                       overwrite: bool = False, progress: bool = True) -> Path:
    """Pretrain and write the folder ``out`` (atomically: a finished folder or none); returns the weights file."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: exists; pass --overwrite to replace it")
    for name, value in (("--steps", steps), ("--batch-size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} {value}: expected a positive integer")
    from qd_core.data import data_identity

    data_root = synthetic_root(cfg, train_spec)
    start = time.perf_counter()
    backbone, losses, accuracies = pretrain(cfg, train_spec, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                            progress=progress)
    b = cfg.model.backbone
    info: dict[str, Any] = {
        "made_by": "python -m train backbone", "config": cfg.name, "data": str(data_root),
        "data_identity": data_identity(data_root),
        "split": "source/train", "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
        "crop_size": cfg.data.crop_size, "architecture": architecture(b),
        "loss": {"first": _mean(losses, True), "last": _mean(losses, False)},
        "pixel_accuracy": {"first": _mean(accuracies, True), "last": _mean(accuracies, False)},
        "seconds": round(time.perf_counter() - start, 1),
    }

    def write(folder: Path) -> None:
        folder.mkdir()
        state = {k: v.detach().contiguous() for k, v in backbone.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE))
        (folder / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        (folder / "README.txt").write_text(
            f"Tiny ViT (patch {b.patch_size}, width {b.embed_dim}, {b.depth} blocks) standing in for DINOv2 in the "
            f"CPU\ndefault run; DINOv2 parameter names, loaded frozen through model.backbone.checkpoint.\n"
            f"Made by `python -m train backbone`: {steps} AdamW steps of batch {batch_size} (lr {lr}, poly decay) on "
            f"the\n"
            f"synthetic source train split with the {cfg.name} config's augmentation, per-pixel cross-entropy of a\n"
            f"linear read-out of every block's patch tokens (discarded afterwards).\n"
            f"Loss {info['loss']['first']} -> {info['loss']['last']}, pixel accuracy "
            f"{info['pixel_accuracy']['first']} -> {info['pixel_accuracy']['last']}; took {info['seconds']} s.\n")

    write_dir(out, write)
    return out / WEIGHTS_FILE


def reusable(folder: Path, cfg: Config, steps: int, data_root: Path, batch_size: int = DEFAULT_BATCH_SIZE,
             lr: float = DEFAULT_LR, seed: int = 0) -> bool:
    """Whether ``folder`` holds a finished backbone made with these settings from scenes like ``data_root``'s."""
    from qd_core.data import data_identity

    try:
        info = json.loads((folder / INFO_FILE).read_text())
    except (OSError, ValueError):
        return False
    b = cfg.model.backbone
    wanted = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "crop_size": cfg.data.crop_size,
              "data_identity": data_identity(data_root)}
    return ((folder / WEIGHTS_FILE).is_file() and all(info.get(k) == v for k, v in wanted.items())
            and info.get("architecture") == architecture(b))


def ensure_tiny_backbone(cfg: Config, train_spec: DatasetSpec, root: Path, *, progress: bool = True) -> Path:
    """The weights file of the stand-in backbone for ``cfg`` under ``root`` (the synthetic data's parent folder):
    reused when made before with the same settings and scenes, made otherwise. Call from one process only (rank 0
    under DDP, then a barrier)."""
    folder = Path(root) / folder_name(cfg.model.backbone)
    steps = cfg.model.backbone.pretrain_steps
    if reusable(folder, cfg, steps, synthetic_root(cfg, train_spec)):
        return folder / WEIGHTS_FILE
    return make_tiny_backbone(cfg, folder, train_spec, steps=steps, overwrite=folder.exists(), progress=progress)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train backbone",
        description="Pretrain the config's ViT on the synthetic source scenes as a frozen-backbone stand-in for "
                    "DINOv2 (the CPU default does this once by itself when model.backbone.pretrain is true).")
    parser.add_argument("--config", default="tiny", help="config name or YAML whose model.backbone and data "
                                                         "augmentation are used (default: tiny)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: backbone-synthetic-<architecture> beside the synthetic data "
                             "folder, where `python -m train` looks for it)")
    parser.add_argument("--data", type=Path, default=None,
                        help="synthetic data root holding source/ (default: the config's data.synthetic.root; "
                             "generated if absent)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps (default: the config's model.backbone.pretrain_steps)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"crops per step (default: {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"AdamW learning rate (default: {DEFAULT_LR})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        if args.data is not None:
            cfg.data.synthetic.root = str(args.data)
        spec = DatasetSpec(kind="synthetic", domain="source", split="train", root=cfg.data.synthetic.root)
        from qd_core.data import ensure_synthetic

        syn = cfg.data.synthetic
        if not (Path(syn.root) / "manifest.json").is_file():  # a finished folder is used as it is
            ensure_synthetic(Path(syn.root), seed=syn.seed, num_train=syn.num_train, num_val=syn.num_val,
                             size=syn.size, progress=not args.no_progress)
        out = args.out if args.out is not None else Path(syn.root).parent / folder_name(cfg.model.backbone)
        steps = args.steps if args.steps is not None else cfg.model.backbone.pretrain_steps
        weights = make_tiny_backbone(cfg, out, spec, steps=steps, batch_size=args.batch_size, lr=args.lr,
                                     seed=args.seed, overwrite=args.overwrite, progress=not args.no_progress)
    except (ValueError, FileExistsError, FileNotFoundError, ConfigError) as err:
        parser.error(str(err))
    print(weights)
    return 0


if __name__ == "__main__":
    sys.exit(main())
