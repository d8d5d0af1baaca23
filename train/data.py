"""Datasets from config specs, and the resumable, shardable order in which training reads them.

The training stream is a sequence of epochs, each a permutation of the dataset seeded by (seed, epoch). Every
optimizer step reads ``grad_accum`` micro-batches; a global micro-batch is ``batch_size × world_size``
consecutive stream positions and rank r takes every world_size-th of them (DistributedSampler's interleave).
Epochs end with the last whole global micro-batch (drop-last), so a micro-batch never straddles two epochs.
The order is a pure function of (seed, position): resuming from step s means starting at micro-batch
s·grad_accum, and one process with batch 2b reads exactly what two processes with batch b read together.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from qd_core.config import DATASET_KINDS, Config, DatasetSpec
from qd_core.data import (
    EvalTransform,
    SegmentationDataset,
    acdc_dataset,
    bdd_dataset,
    cityscapes_dataset,
    collate,
    folder_dataset,
    gta_dataset,
    mapillary_dataset,
)
from qd_core.data.datasets import ACDC_CONDITIONS, Transform
from qd_core.data.transforms import fit_size, normalize

SOURCE_DOMAIN = "source"

# Test-time (long, short) boxes of the 512 configs (METHOD §6.4), scaled by window/512 for other configs.
_TEST_BOX_512 = {
    "synthetic": (1024, 512), "cityscapes": (1024, 512), "mapillary": (1024, 512), "gta": (1280, 720),
    "bdd": (1280, 720), "acdc": (960, 540), "folder": (1024, 512),
}


class DataError(ValueError):
    """A dataset file that could not be loaded (missing, unreadable, wrong size or class ids)."""


# ----------------------------------------------------------------------------------------------------------------
# Specs → datasets
# ----------------------------------------------------------------------------------------------------------------


def target_domains() -> tuple[str, ...]:
    from qd_core.data import TARGET_DOMAINS  # lazy in qd_core.data: it pulls in the corruption library

    return tuple(TARGET_DOMAINS)


def synthetic_root(cfg: Config, spec: DatasetSpec | None = None) -> Path:
    return Path(spec.root if spec is not None and spec.root else cfg.data.synthetic.root)


def default_test_size(kind: str, window: Sequence[int]) -> list[int]:
    """The (long, short) test box of a dataset kind for a model whose inference window is ``window`` (h, w)."""
    if kind not in _TEST_BOX_512:
        raise ValueError(f"dataset kind {kind!r}: expected one of {', '.join(DATASET_KINDS)}")
    scale = max(window) / 512
    long_side, short_side = _TEST_BOX_512[kind]
    return [round(long_side * scale), round(short_side * scale)]


def val_specs(cfg: Config) -> list[DatasetSpec]:
    """``cfg.data.val``, or for synthetic training data: the source val split and every target domain."""
    if cfg.data.val:
        return list(cfg.data.val)
    train = cfg.data.train
    if train.kind != "synthetic":
        return []
    return [DatasetSpec(kind="synthetic", root=train.root, split="val", domain=d)
            for d in (SOURCE_DOMAIN, *target_domains())]


def dataset_root(spec: DatasetSpec, cfg: Config) -> Path:
    """Where ``spec``'s data lives, as one spelling: a synthetic spec without a root is ``cfg``'s synthetic root;
    '~', relative parts and trailing slashes are resolved."""
    root = synthetic_root(cfg, spec) if spec.kind == "synthetic" else Path(spec.root)
    return root.expanduser().resolve()


def is_target(spec: DatasetSpec, cfg: Config, train: DatasetSpec | None = None,
              train_cfg: Config | None = None) -> bool:
    """Whether ``spec`` (its roots resolved with ``cfg``) is an unseen domain relative to the training data
    ``train`` (default ``cfg.data.train``, resolved with ``train_cfg``, default ``cfg``): its mIoU enters the target
    mean. The same folder spelt differently (a trailing slash, a relative path, the synthetic default) is the
    same dataset."""
    train_cfg = train_cfg or cfg
    train = train or train_cfg.data.train
    if spec.kind != train.kind or dataset_root(spec, cfg) != dataset_root(train, train_cfg):
        return True
    return spec.kind == "synthetic" and (spec.domain or SOURCE_DOMAIN) != (train.domain or SOURCE_DOMAIN)


def parse_data_arg(text: str) -> list[DatasetSpec]:
    """``KIND[/DOMAIN]:ROOT[:SPLIT]`` → dataset specs. Without a domain, ``synthetic`` expands to the source and
    every target domain and ``acdc`` to its four conditions, each scored separately (METHOD §8.3)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise ValueError(f"--data {text!r}: expected KIND[/DOMAIN]:ROOT[:SPLIT], e.g. acdc/fog:/data/acdc:val")
    kind, _, domain = parts[0].partition("/")
    if kind not in DATASET_KINDS:
        raise ValueError(f"--data {text!r}: kind {kind!r} is not one of {', '.join(DATASET_KINDS)}")
    split = parts[2] if len(parts) == 3 and parts[2] else "val"
    known = {"synthetic": (SOURCE_DOMAIN, *target_domains()), "acdc": tuple(ACDC_CONDITIONS)}.get(kind)
    if domain and known is not None and domain not in known:
        raise ValueError(f"--data {text!r}: {kind} has no domain {domain!r}; expected one of {', '.join(known)}")
    if domain and known is None:
        raise ValueError(f"--data {text!r}: {kind} has no domains; expected {kind}:ROOT[:SPLIT]")
    if domain:
        domains = [domain]
    elif kind == "synthetic":
        domains = [SOURCE_DOMAIN, *target_domains()]
    elif kind == "acdc":
        domains = list(ACDC_CONDITIONS)
    else:
        domains = [""]
    return [DatasetSpec(kind=kind, root=parts[1], split=split, domain=d) for d in domains]


def build_dataset(spec: DatasetSpec, cfg: Config, transform: Transform | None, seed: int = 0,
                  labels: bool = True) -> SegmentationDataset:
    """The dataset a spec names, in its published layout (METHOD §8); bad folders raise naming the path.
    ``labels=False``: its images only, no label file looked for (a test split predicted for a benchmark server)."""
    root = Path(spec.root)
    if spec.kind != "synthetic" and not spec.root:
        raise ValueError(f"dataset {spec.display_name()!r}: 'root' is empty; expected the dataset folder")
    if spec.kind == "synthetic":
        domain = spec.domain or SOURCE_DOMAIN
        return cityscapes_dataset(synthetic_root(cfg, spec) / domain, spec.split, transform, seed, labels)
    if spec.kind == "cityscapes":
        return cityscapes_dataset(root, spec.split, transform, seed, labels)
    if spec.kind == "gta":
        return gta_dataset(root, transform, seed, labels)
    if spec.kind == "mapillary":
        # Validation is scored on the half-resolution copy (METHOD §8.2); training reads the full images.
        return mapillary_dataset(root, spec.split, half=spec.split == "val", transform=transform, seed=seed,
                                 labels=labels)
    if spec.kind == "bdd":
        return bdd_dataset(root, spec.split, transform, seed, labels)
    if spec.kind == "acdc":
        return acdc_dataset(root, spec.domain or ACDC_CONDITIONS, spec.split, transform, seed, labels)
    if spec.kind == "folder":
        return folder_dataset(root, transform, seed)
    raise ValueError(f"dataset kind {spec.kind!r}: expected one of {', '.join(DATASET_KINDS)}")


@dataclass
class KeepSizeTransform:
    """Test-time preprocessing without resizing: normalise only (``DatasetSpec.test_size`` empty)."""

    mean: Sequence[float]
    std: Sequence[float]

    def __call__(self, image: np.ndarray, label: np.ndarray | None = None,
                 rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """image uint8 (H, W, 3), label (H, W) or None → image float32 (3, H, W), label int64 (H, W) or None."""
        label_t = None if label is None else torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))
        return normalize(image, self.mean, self.std), label_t


def eval_transform(spec: DatasetSpec, cfg: Config) -> EvalTransform | KeepSizeTransform:
    """Keep-ratio resize into ``spec.test_size`` (long, short), or no resize when it is empty."""
    mean, std = cfg.model.pixel_mean, cfg.model.pixel_std
    if spec.test_size:
        return EvalTransform(box=(int(spec.test_size[0]), int(spec.test_size[1])), mean=mean, std=std)
    return KeepSizeTransform(mean, std)


def test_image_size(height: int, width: int, spec: DatasetSpec) -> tuple[int, int]:
    """The (h, w) an image of (height, width) is scored at after the spec's test-time resize."""
    return fit_size(height, width, tuple(spec.test_size)) if spec.test_size else (height, width)


# ----------------------------------------------------------------------------------------------------------------
# The resumable training order
# ----------------------------------------------------------------------------------------------------------------


def epoch_permutation(size: int, seed: int, epoch: int) -> list[int]:
    """The dataset order of one epoch: a permutation of range(size) that depends only on (seed, epoch)."""
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
    return torch.randperm(size, generator=generator).tolist()


@dataclass(frozen=True)
class StreamItem:
    """One sample of the training stream: dataset index, the epoch it is read in, its global stream position."""

    index: int
    epoch: int
    position: int


class StreamSampler(Sampler[list[StreamItem]]):
    """Yields this rank's micro-batches of the global training stream, from micro-batch ``start`` onward.

    Global micro-batch k covers the positions [k·G, (k+1)·G) with G = batch_size × world_size; its samples are
    drawn from epoch k // (size // G) in that epoch's permutation; rank r takes slots r, r + W, r + 2W, ….
    """

    def __init__(self, size: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 start: int = 0, count: int | None = None) -> None:
        self.global_batch = batch_size * world_size
        if size < self.global_batch:
            raise ValueError(f"training set has {size} samples: expected at least batch_size × world_size = "
                             f"{batch_size} × {world_size} = {self.global_batch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size ({world_size}), got {rank}")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.start, self.count = start, count
        self.per_epoch = size // self.global_batch
        self._cached: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        if self.count is None:
            raise TypeError("StreamSampler without a count is endless")
        return self.count

    def micro_batch(self, k: int) -> list[StreamItem]:
        """This rank's part of global micro-batch ``k``."""
        epoch, within = divmod(k, self.per_epoch)
        order = self._order(epoch)
        first = within * self.global_batch
        slots = range(self.rank, self.global_batch, self.world_size)
        return [StreamItem(order[first + j], epoch, k * self.global_batch + j) for j in slots]

    def _order(self, epoch: int) -> list[int]:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, epoch_permutation(self.size, self.seed, epoch))
        return self._cached[1]

    def __iter__(self) -> Iterator[list[StreamItem]]:
        k = self.start
        while self.count is None or k < self.start + self.count:
            yield self.micro_batch(k)
            k += 1


class SafeDataset(Dataset):
    """A dataset for DataLoaders that reports bad files as data, not as worker tracebacks.

    Items are plain indices or ``StreamItem``s; for a ``StreamItem`` the item's epoch is set on the wrapped
    dataset first (so the augmentation draws from the (seed, epoch, index) stream whichever worker reads it)
    and its stream position is added to the sample. A file that cannot be loaded does not raise inside a worker
    (the DataLoader would wrap it in a traceback): the item carries the message and ``collate_safe`` turns the
    batch into ``{"error": message}``, which ``check_batch`` raises as one DataError in the main process.
    """

    def __init__(self, dataset: SegmentationDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: StreamItem | int) -> dict[str, Any]:
        index = item.index if isinstance(item, StreamItem) else int(item)
        if isinstance(item, StreamItem):
            self.dataset.set_epoch(item.epoch)
        try:
            sample = self.dataset[index]
        except (OSError, ValueError) as err:
            return {"error": str(err)}
        if isinstance(item, StreamItem):
            sample["position"] = item.position
        return sample


def collate_safe(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``qd_core.data.collate`` (plus a (B,) int64 ``position`` tensor for stream items), or ``{"error": msg}``
    if any item failed to load."""
    for item in batch:
        if "error" in item:
            return {"error": item["error"]}
    out = collate(batch)
    if "position" in out:
        out["position"] = torch.as_tensor(out["position"], dtype=torch.int64)
    return out


def check_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """Raise the DataError a worker reported in place of the batch, else return the batch."""
    if "error" in batch:
        raise DataError(batch["error"])
    return batch


__all__ = [
    "DataError", "KeepSizeTransform", "SafeDataset", "StreamItem", "StreamSampler", "build_dataset",
    "check_batch", "collate_safe", "default_test_size", "epoch_permutation", "eval_transform", "is_target",
    "parse_data_arg", "synthetic_root", "target_domains", "test_image_size", "val_specs",
]
