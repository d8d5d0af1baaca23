"""The stand-in backbone of the CPU default: pretrained on the synthetic source, saved in DINOv2 names, loaded
frozen."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qd_core import build_student
from qd_core.checkpoint import load_torch_file
from qd_core.config import Config, DatasetSpec, load_config
from qd_core.data import ensure_synthetic
from train.backbone import INFO_FILE, ensure_tiny_backbone, folder_name, main, make_tiny_backbone, pretrain
from train.run import prepare_inputs


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("syn") / "synthetic", num_train=4, num_val=1, size=[64, 128],
                            progress=False)


def config(data_root: Path, *extra: str) -> Config:
    return load_config("tiny", [f"data.synthetic.root={data_root}", "data.synthetic.num_train=4",
                                "data.synthetic.num_val=1", "data.synthetic.size=[64,128]", "data.crop_size=64",
                                "model.backbone.pretrain=true", "model.backbone.pretrain_steps=3", *extra])


def source(data_root: Path) -> DatasetSpec:
    return DatasetSpec(kind="synthetic", domain="source", split="train", root=str(data_root))


def test_pretraining_lowers_the_loss_and_leaves_the_backbone_frozen(data_root: Path) -> None:
    backbone, losses, accuracies = pretrain(config(data_root), source(data_root), steps=30, batch_size=4, lr=3e-3,
                                            seed=0, progress=False)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert len(accuracies) == 30 and all(0.0 <= a <= 1.0 for a in accuracies)
    assert not any(p.requires_grad for p in backbone.parameters()) and not backbone.training


def test_folder_loads_as_the_students_frozen_backbone(data_root: Path, tmp_path: Path) -> None:
    cfg = config(data_root)
    weights = make_tiny_backbone(cfg, tmp_path / "bb", source(data_root), steps=2, batch_size=2, progress=False)
    info = json.loads((tmp_path / "bb" / INFO_FILE).read_text())
    assert info["steps"] == 2 and info["architecture"]["embed_dim"] == cfg.model.backbone.embed_dim
    cfg.model.backbone.checkpoint = str(weights)
    student = build_student(cfg)
    state = load_torch_file(weights)
    assert set(state) == set(student.backbone.state_dict())  # DINOv2 parameter names, nothing else
    assert torch.equal(student.backbone.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    with pytest.raises(FileExistsError, match="--overwrite"):
        make_tiny_backbone(cfg, tmp_path / "bb", source(data_root), steps=2, batch_size=2, progress=False)


def test_train_makes_it_once_beside_the_data_and_names_it_in_the_config(data_root: Path) -> None:
    cfg = config(data_root, "teacher.enabled=false")
    prepare_inputs(cfg, progress=False)
    weights = Path(cfg.model.backbone.checkpoint)
    assert weights.parent == data_root.parent / folder_name(cfg.model.backbone) and weights.is_file()
    made = weights.stat().st_mtime_ns
    again = config(data_root, "teacher.enabled=false")
    prepare_inputs(again, progress=False)
    assert again.model.backbone.checkpoint == str(weights) and weights.stat().st_mtime_ns == made  # reused
    other = config(data_root, "teacher.enabled=false", "model.backbone.pretrain_steps=2")
    assert ensure_tiny_backbone(other, source(data_root), data_root.parent, progress=False) == weights
    assert json.loads((weights.parent / INFO_FILE).read_text())["steps"] == 2  # other settings: made afresh
    made = weights.stat().st_mtime_ns
    manifest = data_root / "manifest.json"
    record = json.loads(manifest.read_text())
    try:  # scenes of an older generator version: pretrained on other images, so made afresh
        manifest.write_text(json.dumps({**record, "version": record["version"] - 1}))
        assert ensure_tiny_backbone(other, source(data_root), data_root.parent, progress=False) == weights
        assert weights.stat().st_mtime_ns != made
        info = json.loads((weights.parent / INFO_FILE).read_text())
        assert info["data_identity"]["version"] == record["version"] - 1
    finally:
        manifest.write_text(json.dumps(record))


def test_a_backbone_of_another_mlp_ratio_is_made_afresh_not_reused(data_root: Path, tmp_path: Path) -> None:
    """The folder name holds the main sizes only: the record must hold all of the architecture, or a changed
    mlp_ratio would reuse weights of another shape and fail to load."""
    first = ensure_tiny_backbone(config(data_root, "model.backbone.pretrain_steps=1"), source(data_root), tmp_path,
                                 progress=False)
    made = first.stat().st_mtime_ns
    cfg = config(data_root, "model.backbone.pretrain_steps=1", "model.backbone.mlp_ratio=2.0")
    weights = ensure_tiny_backbone(cfg, source(data_root), tmp_path, progress=False)
    assert weights.stat().st_mtime_ns != made
    cfg.model.backbone.checkpoint = str(weights)
    build_student(cfg)  # loads strictly


def test_pretrain_on_non_synthetic_data_is_one_clear_error(data_root: Path) -> None:
    cfg = config(data_root, "teacher.enabled=false", "data.train.kind=cityscapes", "data.train.root=/nowhere")
    with pytest.raises(ValueError, match="model.backbone.pretrain"):
        prepare_inputs(cfg, progress=False)


def test_cli_writes_the_folder(data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--data", str(data_root), "--out", str(tmp_path / "cli"), "--steps", "1", "--batch-size", "2",
                 "--no-progress"]) == 0
    assert (tmp_path / "cli" / "backbone.safetensors").is_file()
    with pytest.raises(SystemExit):
        main(["--data", str(data_root), "--out", str(tmp_path / "cli"), "--steps", "1", "--no-progress"])
    assert "exists; pass --overwrite" in capsys.readouterr().err
