"""The resumable, shardable training order and the dataset plumbing of the trainer."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qd_core.config import DatasetSpec, load_config
from qd_core.data import TARGET_DOMAINS, ensure_synthetic
from train.data import (
    DataError,
    SafeDataset,
    StreamItem,
    StreamSampler,
    build_dataset,
    check_batch,
    collate_safe,
    default_test_size,
    epoch_permutation,
    is_target,
    parse_data_arg,
    val_specs,
)


def _take(sampler: StreamSampler, n: int) -> list[list[StreamItem]]:
    out, it = [], iter(sampler)
    for _ in range(n):
        out.append(next(it))
    return out


def test_each_epoch_visits_every_sample_once() -> None:
    sampler = StreamSampler(12, 3, seed=7)
    batches = _take(sampler, 8)  # 4 micro-batches per epoch → 2 epochs
    for epoch in (0, 1):
        items = [i for b in batches for i in b if i.epoch == epoch]
        assert sorted(i.index for i in items) == list(range(12))
    assert [i.position for b in batches for i in b] == list(range(24))


def test_epochs_are_shuffled_differently() -> None:
    assert epoch_permutation(50, 0, 0) != epoch_permutation(50, 0, 1)
    assert epoch_permutation(50, 0, 3) == epoch_permutation(50, 0, 3)


def test_incomplete_last_micro_batch_of_an_epoch_is_dropped() -> None:
    sampler = StreamSampler(10, 4, seed=0)  # 2 whole micro-batches per epoch, 2 samples dropped
    first_epoch = _take(sampler, 2)
    assert all(i.epoch == 0 for b in first_epoch for i in b)
    assert all(i.epoch == 1 for i in _take(sampler, 3)[2])


def test_starting_later_continues_the_same_stream() -> None:
    full = _take(StreamSampler(9, 2, seed=3), 10)
    resumed = _take(StreamSampler(9, 2, seed=3, start=6), 4)
    assert resumed == full[6:]


def test_two_ranks_together_read_what_one_process_reads() -> None:
    single = _take(StreamSampler(16, 4, seed=1), 6)
    rank0 = _take(StreamSampler(16, 2, seed=1, rank=0, world_size=2), 6)
    rank1 = _take(StreamSampler(16, 2, seed=1, rank=1, world_size=2), 6)
    for one, a, b in zip(single, rank0, rank1):
        assert sorted(a + b, key=lambda i: i.position) == one
        assert [i.position % 2 for i in a] == [0, 0] and [i.position % 2 for i in b] == [1, 1]


def test_count_bounds_the_sampler() -> None:
    sampler = StreamSampler(8, 2, seed=0, start=3, count=5)
    assert len(sampler) == 5 and len(list(sampler)) == 5


def test_too_small_a_dataset_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least batch_size"):
        StreamSampler(3, 2, seed=0, world_size=2)


def test_parse_data_arg_expands_synthetic_and_acdc() -> None:
    syn = parse_data_arg("synthetic:/d/syn")
    assert [s.domain for s in syn] == ["source", *TARGET_DOMAINS] and all(s.split == "val" for s in syn)
    acdc = parse_data_arg("acdc:/d/acdc:test")
    assert [s.domain for s in acdc] == ["fog", "night", "rain", "snow"] and acdc[0].split == "test"
    (fog,) = parse_data_arg("acdc/fog:/d/acdc")
    assert (fog.kind, fog.root, fog.domain) == ("acdc", "/d/acdc", "fog")


@pytest.mark.parametrize("text", ["cityscapes", "nope:/x", ":/x", "cityscapes:/x:val:extra"])
def test_parse_data_arg_rejects_malformed_text(text: str) -> None:
    with pytest.raises(ValueError, match="--data"):
        parse_data_arg(text)


@pytest.mark.parametrize("text, expected", [("synthetic/nope:/x", "expected one of source, fog"),
                                            ("acdc/dusk:/x", "expected one of fog, night, rain, snow"),
                                            ("cityscapes/fog:/x", "cityscapes has no domains")])
def test_parse_data_arg_names_the_domains_it_knows(text: str, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        parse_data_arg(text)


def test_default_test_sizes_follow_the_paper_and_scale_with_the_window() -> None:
    assert default_test_size("cityscapes", [512, 512]) == [1024, 512]
    assert default_test_size("acdc", [1024, 1024]) == [1920, 1080]
    assert default_test_size("bdd", [512, 512]) == [1280, 720]
    assert default_test_size("synthetic", [128, 128]) == [256, 128]


def test_default_validation_is_source_plus_every_target_domain() -> None:
    cfg = load_config("tiny", ["data.val=[]"])
    specs = val_specs(cfg)
    assert [s.domain for s in specs] == ["source", *TARGET_DOMAINS]
    assert [is_target(s, cfg) for s in specs] == [False] + [True] * len(TARGET_DOMAINS)


def test_other_dataset_kinds_are_targets() -> None:
    cfg = load_config("tiny")
    train = DatasetSpec(kind="gta", root="/d/gta", split="train")
    assert is_target(DatasetSpec(kind="cityscapes", root="/d/cs"), cfg, train)
    assert not is_target(DatasetSpec(kind="gta", root="/d/gta"), cfg, train)


def test_the_training_data_spelt_differently_is_still_the_source(tmp_path: Path, monkeypatch) -> None:
    """A trailing slash, a relative path or the synthetic default root must not turn the source into a target
    (it would enter the target mean)."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny", [f"data.synthetic.root={tmp_path / 'syn'}"])
    cityscapes = DatasetSpec(kind="cityscapes", root=str(tmp_path / "cs"), split="train")
    assert not is_target(DatasetSpec(kind="cityscapes", root=f"{tmp_path / 'cs'}/", split="val"), cfg, cityscapes)
    assert not is_target(DatasetSpec(kind="cityscapes", root="cs", split="val"), cfg, cityscapes)
    assert is_target(DatasetSpec(kind="cityscapes", root="cs2", split="val"), cfg, cityscapes)
    # The default synthetic training spec has no root: the config's synthetic root is the same folder.
    assert cfg.data.train.kind == "synthetic" and not cfg.data.train.root
    source = DatasetSpec(kind="synthetic", root=str(tmp_path / "syn"), split="val", domain="source")
    assert not is_target(source, cfg)
    assert is_target(DatasetSpec(kind="synthetic", root=str(tmp_path / "syn"), split="val", domain="fog"), cfg)
    assert is_target(DatasetSpec(kind="synthetic", root=str(tmp_path / "other"), split="val", domain="source"),
                     cfg)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("syn"), num_train=4, num_val=1, size=[64, 128], progress=False)


def test_a_bad_file_becomes_one_error_naming_it(data_root: Path, tmp_path: Path) -> None:
    cfg = load_config("tiny", [f"data.synthetic.root={data_root}"])
    dataset = build_dataset(DatasetSpec(kind="synthetic", split="train", domain="source"), cfg, None)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    dataset.samples[1] = type(dataset.samples[1])(broken, dataset.samples[1].label)
    safe = SafeDataset(dataset)
    batch = collate_safe([safe[StreamItem(0, 0, 0)], safe[StreamItem(1, 0, 1)]])
    with pytest.raises(DataError, match="broken.png") as info:
        check_batch(batch)
    assert "\n" not in str(info.value)


def test_stream_items_set_the_epoch_and_carry_the_position(data_root: Path) -> None:
    cfg = load_config("tiny", [f"data.synthetic.root={data_root}"])
    seen = []

    def transform(image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator):
        seen.append(int(rng.integers(1 << 30)))
        return image, label

    dataset = build_dataset(DatasetSpec(kind="synthetic", split="train", domain="source"), cfg, transform)
    safe = SafeDataset(dataset)
    a = safe[StreamItem(2, 0, 5)]
    safe[StreamItem(2, 1, 9)]
    safe[StreamItem(2, 0, 5)]
    assert a["position"] == 5
    assert seen[0] == seen[2] != seen[1]


def test_synthetic_spec_reads_the_domain_folder(data_root: Path) -> None:
    cfg = load_config("tiny", [f"data.synthetic.root={data_root}"])
    fog = build_dataset(DatasetSpec(kind="synthetic", split="val", domain="fog"), cfg, None)
    assert len(fog) == 1 and "/fog/" in str(fog.samples[0].image)
    image = np.asarray(Image.open(fog.samples[0].image))
    assert image.shape == (64, 128, 3)
