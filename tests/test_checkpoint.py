"""Checkpoints: DINOv2 14→16 conversion of official-format state dicts, strict loading with key reports, safe file
reading, the convert-dinov2 command, and student save/load."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from qd_core.backbone import DinoVisionTransformer
from qd_core.checkpoint import (CheckpointError, convert_dinov2, load_backbone_checkpoint, load_student,
                                load_student_weights, load_torch_file, main, save_state_file, save_student,
                                state_dict_mismatch)
from qd_core.config import BackboneConfig, Config, ConfigError, load_config
from qd_core.reins import LoRAReins

REPO = Path(__file__).resolve().parent.parent
# name: (embed_dim, depth, num_heads) of the official DINOv2 /14 models, pretrained at 518 = 37 x 14.
ARCHS = {"vits14": (384, 12, 6), "vitl14": (1024, 24, 16)}
OFFICIAL_GRID = 37


def official_dinov2_state(dim: int, depth: int, *, fill=torch.randn) -> dict[str, Tensor]:
    """A state dict with the names and shapes of ``dinov2_vit*14_pretrain.pth``.

    ``fill`` makes the block tensors: random for small models; ``torch.empty`` where only names and shapes are
    checked (ViT-L's 300 M block weights would take most of the test's time to draw).
    """
    g = torch.Generator().manual_seed(dim + depth)
    state = {
        "cls_token": torch.randn(1, 1, dim, generator=g),
        "pos_embed": torch.randn(1, 1 + OFFICIAL_GRID ** 2, dim, generator=g),
        "mask_token": torch.randn(1, dim, generator=g),
        "patch_embed.proj.weight": torch.randn(dim, 3, 14, 14, generator=g),
        "patch_embed.proj.bias": torch.randn(dim, generator=g),
        "norm.weight": torch.randn(dim, generator=g),
        "norm.bias": torch.randn(dim, generator=g),
    }
    for i in range(depth):
        shapes = {"norm1.weight": (dim,), "norm1.bias": (dim,), "attn.qkv.weight": (3 * dim, dim),
                  "attn.qkv.bias": (3 * dim,), "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,),
                  "ls1.gamma": (dim,), "norm2.weight": (dim,), "norm2.bias": (dim,),
                  "mlp.fc1.weight": (4 * dim, dim), "mlp.fc1.bias": (4 * dim,), "mlp.fc2.weight": (dim, 4 * dim),
                  "mlp.fc2.bias": (dim,), "ls2.gamma": (dim,)}
        state.update({f"blocks.{i}.{k}": fill(*s) for k, s in shapes.items()})
    return state


@pytest.fixture(scope="module")
def official():
    """Official-format state dicts, each built once per module."""
    cache: dict[str, dict[str, Tensor]] = {}

    def get(arch: str) -> dict[str, Tensor]:
        if arch not in cache:
            dim, depth, _ = ARCHS[arch]
            cache[arch] = official_dinov2_state(dim, depth, fill=torch.randn if arch == "vits14" else torch.empty)
        return cache[arch]

    return get


def tiny_backbone_config(**changes) -> BackboneConfig:
    base = dict(patch_size=16, embed_dim=16, depth=2, num_heads=2, pos_grid_size=64)
    return BackboneConfig(**{**base, **changes})


# --------------------------------------------------------------------------------------------------------------
# convert_dinov2
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize(("size", "grid"), [(512, 32), (1024, 64)])
def test_converted_official_checkpoint_loads_strictly(official, arch, size, grid):
    dim, depth, heads = ARCHS[arch]
    state = official(arch)
    converted = convert_dinov2(state, patch_size=16, height=size, width=size)
    assert converted["patch_embed.proj.weight"].shape == (dim, 3, 16, 16)
    assert converted["pos_embed"].shape == (1, 1 + grid * grid, dim)
    assert torch.equal(converted["pos_embed"][:, 0], state["pos_embed"][:, 0])
    assert all(converted[k] is state[k] for k in state if k not in ("pos_embed", "patch_embed.proj.weight"))
    cfg = BackboneConfig(patch_size=16, embed_dim=dim, depth=depth, num_heads=heads, pos_grid_size=size)
    with torch.device("meta"):  # names and shapes are what is checked; no need to allocate ViT-L twice
        backbone = DinoVisionTransformer(cfg)
    assert state_dict_mismatch(backbone.state_dict(), converted) == ""
    result = backbone.load_state_dict(converted, strict=True, assign=True)
    assert result.missing_keys == [] and result.unexpected_keys == []


def test_conversion_equals_reins_conversion_tool_on_random_weights():
    """The values, not only the shapes: Rein's tools/convert_models/convert_dinov2_large_512x512.py re-stated
    (bicubic, align_corners=False, to an explicit size; no DINOv2-style +0.1 scale factor) on random tensors."""
    g = torch.Generator().manual_seed(0)
    kernel = torch.randn(8, 3, 14, 14, generator=g)
    pos = torch.randn(1, 1 + OFFICIAL_GRID ** 2, 8, generator=g)
    out = convert_dinov2({"patch_embed.proj.weight": kernel, "pos_embed": pos}, patch_size=16, height=512,
                         width=512)
    grid = pos[:, 1:].reshape(1, OFFICIAL_GRID, OFFICIAL_GRID, 8).permute(0, 3, 1, 2)
    expected_pos = torch.cat([pos[:, :1], F.interpolate(grid, size=(32, 32), mode="bicubic", align_corners=False)
                              .permute(0, 2, 3, 1).reshape(1, 32 * 32, 8)], dim=1)
    expected_kernel = F.interpolate(kernel, size=(16, 16), mode="bicubic", align_corners=False)
    assert torch.equal(out["pos_embed"], expected_pos)
    assert torch.equal(out["patch_embed.proj.weight"], expected_kernel)


def test_kernel_resize_keeps_magnitude():
    # Bicubic weights sum to one: a constant kernel stays the same constant (no (16/14)^2 rescaling).
    state = {"patch_embed.proj.weight": torch.full((4, 3, 14, 14), 0.25), "pos_embed": torch.zeros(1, 1 + 4, 4)}
    kernel = convert_dinov2(state, patch_size=16, height=32, width=32)["patch_embed.proj.weight"]
    torch.testing.assert_close(kernel, torch.full((4, 3, 16, 16), 0.25), atol=1e-6, rtol=0)


def test_position_grid_keeps_its_orientation_on_a_non_square_target():
    # Values that change only down the rows must still change only down the rows after 37x37 -> 32x64.
    rows = torch.arange(OFFICIAL_GRID, dtype=torch.float32)[:, None, None].expand(OFFICIAL_GRID, OFFICIAL_GRID, 2)
    pos = torch.cat([torch.full((1, 2), 7.0), rows.reshape(-1, 2)])[None]
    state = {"patch_embed.proj.weight": torch.zeros(2, 3, 14, 14), "pos_embed": pos}
    out = convert_dinov2(state, patch_size=16, height=512, width=1024)["pos_embed"]
    grid = out[0, 1:].reshape(32, 64, 2)
    assert torch.allclose(grid, grid[:, :1].expand_as(grid), atol=1e-5)
    assert bool((grid[1:, 0, 0] > grid[:-1, 0, 0]).all())
    assert torch.equal(out[0, 0], torch.full((2,), 7.0))


@pytest.mark.parametrize("missing", ["pos_embed", "patch_embed.proj.weight"])
def test_conversion_names_a_missing_key(missing):
    state = {"patch_embed.proj.weight": torch.zeros(2, 3, 14, 14), "pos_embed": torch.zeros(1, 5, 2)}
    del state[missing]
    with pytest.raises(ValueError, match=f"no '{missing}'"):
        convert_dinov2(state)


def test_conversion_rejects_a_non_square_position_grid():
    state = {"patch_embed.proj.weight": torch.zeros(2, 3, 14, 14), "pos_embed": torch.zeros(1, 1 + 6, 2)}
    with pytest.raises(ValueError, match="'pos_embed' has 6 patch positions.*square"):
        convert_dinov2(state)


# --------------------------------------------------------------------------------------------------------------
# Reading files and strict backbone loading
# --------------------------------------------------------------------------------------------------------------


def test_backbone_loads_a_converted_file(official, tmp_path):
    converted = convert_dinov2(official("vits14"), patch_size=16, height=256, width=256)
    path = tmp_path / "dinov2_vits16_256.safetensors"
    save_state_file(converted, path)
    backbone = DinoVisionTransformer(BackboneConfig(patch_size=16, embed_dim=384, depth=12, num_heads=6,
                                                    pos_grid_size=256))
    load_backbone_checkpoint(backbone, path)
    assert torch.equal(backbone.pos_embed, converted["pos_embed"])
    assert torch.equal(backbone.blocks[11].ls2.gamma, converted["blocks.11.ls2.gamma"])
    assert not any(p.requires_grad for p in backbone.parameters())


def test_wrong_key_is_named_as_missing_and_unexpected(tmp_path):
    backbone = DinoVisionTransformer(tiny_backbone_config())
    state = dict(backbone.state_dict())
    state["blocks.0.attn.qkvx.weight"] = state.pop("blocks.0.attn.qkv.weight")
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as info:
        load_backbone_checkpoint(backbone, tmp_path / "bad.pth")
    message = str(info.value)
    assert "bad.pth" in message
    assert "1 missing key(s): blocks.0.attn.qkv.weight" in message
    assert "1 unexpected key(s): blocks.0.attn.qkvx.weight" in message
    assert "\n" not in message


def test_shape_mismatch_is_named_with_both_shapes_and_a_conversion_hint(tmp_path):
    state = DinoVisionTransformer(tiny_backbone_config(pos_grid_size=32)).state_dict()
    save_state_file(state, tmp_path / "grid2.safetensors")
    with pytest.raises(CheckpointError, match=r"pos_embed \(1, 5, 16\) vs model \(1, 17, 16\).*convert-dinov2"):
        load_backbone_checkpoint(DinoVisionTransformer(tiny_backbone_config()), tmp_path / "grid2.safetensors")


def test_long_key_lists_are_truncated_with_a_count():
    expected = {f"k{i:02d}": torch.zeros(1) for i in range(25)}
    message = state_dict_mismatch(expected, {})
    assert message.startswith("25 missing key(s): k00, k01,") and message.endswith("... and 15 more")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint file '.*nope\.pth' does not exist"):
        load_torch_file(tmp_path / "nope.pth")


@pytest.mark.parametrize("name", ["corrupt.pth", "corrupt.safetensors"])
def test_corrupt_file_is_named(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError,
                       match=rf"checkpoint file '.*{name}' could not be read as a PyTorch .* state dict: \w+") as info:
        load_torch_file(tmp_path / name)
    assert "\n" not in str(info.value)


def test_pickled_python_objects_are_refused(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1)}, tmp_path / "train.pth")
    with pytest.raises(CheckpointError, match="train.pth' could not be read"):
        load_torch_file(tmp_path / "train.pth")


@pytest.mark.parametrize("wrapper", ["model", "state_dict", "teacher"])
def test_nested_state_dicts_are_unwrapped(tmp_path, wrapper):
    state = {"w": torch.arange(3.0), "b": torch.ones(2)}
    torch.save({wrapper: state, "iteration": 12}, tmp_path / "wrapped.pth")
    loaded = load_torch_file(tmp_path / "wrapped.pth")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_a_file_without_tensors_is_refused(tmp_path):
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    with pytest.raises(CheckpointError, match="not tensors: epoch, lr"):
        load_torch_file(tmp_path / "meta.pth")


# --------------------------------------------------------------------------------------------------------------
# convert-dinov2 command
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def tiny_official(tmp_path) -> Path:
    path = tmp_path / "dinov2_tiny14_pretrain.pth"
    torch.save(official_dinov2_state(8, 1), path)
    return path


def test_cli_converts_and_reports_what_changed(tiny_official, tmp_path, capsys):
    out = tmp_path / "converted.safetensors"
    assert main(["convert-dinov2", str(tiny_official), str(out), "--height", "64", "--width", "64"]) == 0
    converted = load_file(str(out))
    expected = convert_dinov2(torch.load(tiny_official, weights_only=True), patch_size=16, height=64, width=64)
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)
    printed = capsys.readouterr().out
    assert "pos_embed: (1, 1370, 8) -> (1, 17, 8)" in printed
    assert "patch_embed.proj.weight: (8, 3, 14, 14) -> (8, 3, 16, 16)" in printed
    assert f"{len(expected) - 2} other tensors unchanged" in printed
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_cli_refuses_to_overwrite_without_the_flag(tiny_official, tmp_path, capsys):
    out = tmp_path / "converted.pth"
    out.write_bytes(b"keep me")
    assert main(["convert-dinov2", str(tiny_official), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert main(["convert-dinov2", str(tiny_official), str(out), "--overwrite", "--height", "32", "--width", "32"]) == 0
    assert load_torch_file(out)["pos_embed"].shape == (1, 5, 8)


def test_cli_refuses_what_no_backbone_could_load_or_no_file_could_hold(tiny_official, tmp_path, capsys):
    # The backbone keeps a square position grid; a non-square one converted fine and then never loaded.
    out = tmp_path / "converted.safetensors"
    assert main(["convert-dinov2", str(tiny_official), str(out), "--height", "64", "--width", "96"]) == 2
    assert "expected one square size" in capsys.readouterr().err and not out.exists()
    folder = tmp_path / "outdir"
    folder.mkdir()
    assert main(["convert-dinov2", str(tiny_official), str(folder), "--overwrite"]) == 2
    assert "is a folder" in capsys.readouterr().err
    (tmp_path / "afile").write_text("not a folder")
    assert main(["convert-dinov2", str(tiny_official), str(tmp_path / "afile" / "x.safetensors"), "--height", "32",
                 "--width", "32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write '{tmp_path / 'afile' / 'x.safetensors'}'") and err.count("\n") == 1


def test_cli_names_the_input_of_a_state_dict_that_is_not_dinov2(tmp_path, capsys):
    torch.save({"a": torch.zeros(2)}, tmp_path / "other.pth")
    assert main(["convert-dinov2", str(tmp_path / "other.pth"), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other.pth': DINOv2 state dict has no 'patch_embed.proj.weight'" in err
    assert "expected an official DINOv2 ViT checkpoint" in err


def test_weights_of_another_vit_size_are_not_told_to_convert(official):
    """ViT-S weights for a ViT-B-wide backbone: converting cannot fix a width, so the hint says what can."""
    state = convert_dinov2(official("vits14"), patch_size=16, height=256, width=256)
    wider = DinoVisionTransformer(BackboneConfig(patch_size=16, embed_dim=768, depth=2, num_heads=12,
                                                 pos_grid_size=256))
    problem = state_dict_mismatch(wider.state_dict(), state)
    assert "its width is 384 but the model's is 768" in problem and "convert-dinov2" not in problem


def test_a_dinov2_training_checkpoints_teacher_backbone_converts(tiny_official, tmp_path):
    # DINOv2 saves {"teacher": {"backbone.*": ..., "dino_head.*": ..., "ibot_head.*": ...}} while it trains.
    state = torch.load(tiny_official, weights_only=True)
    wrapped = {"teacher": {**{f"backbone.{k}": v for k, v in state.items()},
                           "dino_head.mlp.0.weight": torch.zeros(4, 8), "ibot_head.last_layer.weight": torch.zeros(4)}}
    torch.save(wrapped, tmp_path / "training.pth")
    assert main(["convert-dinov2", str(tmp_path / "training.pth"), str(tmp_path / "a.safetensors"), "--height", "32",
                 "--width", "32"]) == 0
    assert main(["convert-dinov2", str(tiny_official), str(tmp_path / "b.safetensors"), "--height", "32", "--width",
                 "32"]) == 0
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_takes_the_reference_tools_flags(tiny_official, tmp_path, capsys):
    out = tmp_path / "converted.safetensors"
    assert main(["convert-dinov2", "--pretrained", str(tiny_official), "--converted", str(out), "--kernel", "16",
                 "--height", "32", "--width", "32"]) == 0
    assert load_file(str(out))["pos_embed"].shape == (1, 5, 8)
    for argv, named in ((["--pretrained", str(tiny_official), str(tiny_official), str(out)], "IN"),
                        ([str(tiny_official)], "OUT")):
        with pytest.raises(SystemExit) as exit_info:
            main(["convert-dinov2", *argv])
        assert exit_info.value.code == 2
        assert f"{named}: expected it once" in capsys.readouterr().err


def test_cli_names_a_bad_size_flag_before_reading_the_input(tmp_path, capsys):
    missing = str(tmp_path / "not_read.pth")
    for flags, named in ((["--kernel", "0"], "--kernel 0"), (["--height", "-16"], "--height -16"),
                         (["--height", "100"], "multiples of --kernel 16")):
        assert main(["convert-dinov2", missing, str(tmp_path / "o.safetensors"), *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and named in err[0]


def test_a_folder_given_as_a_student_checkpoint_is_named_as_such(tmp_path):
    from qd_core.checkpoint import read_student_meta

    with pytest.raises(CheckpointError, match=r"is a folder: expected a \.safetensors file"):
        read_student_meta(tmp_path)


def test_cli_runs_as_a_module(tiny_official, tmp_path):
    out = tmp_path / "converted.safetensors"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "qd_core.checkpoint", "convert-dinov2", str(tiny_official),
                             str(out), "--height", "32", "--width", "32"], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert load_file(str(out))["pos_embed"].shape == (1, 5, 8)


# --------------------------------------------------------------------------------------------------------------
# Student checkpoints (with a stand-in model: a frozen backbone child plus trainable parts)
# --------------------------------------------------------------------------------------------------------------


class StandIn(nn.Module):
    def __init__(self, cfg: Config, seed: int, extra_head: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        b = cfg.model.backbone
        self.backbone = DinoVisionTransformer(b)
        self.reins = LoRAReins(b.depth, b.embed_dim, cfg.model.reins)
        self.head = nn.Linear(b.embed_dim, 3)
        self.tied = self.head  # the same tensors under two names
        self.register_buffer("transposed", torch.randn(4, 3).t())  # a non-contiguous tensor
        if extra_head:
            self.head2 = nn.Linear(3, 3)


def tiny_cfg(backbone_checkpoint: str = "") -> Config:
    return load_config("tiny", overrides=[f"model.backbone.checkpoint={backbone_checkpoint!r}"])


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_student_round_trip_with_a_random_backbone(tmp_path):
    cfg = tiny_cfg()
    model = StandIn(cfg, seed=0)
    path = save_student(model, cfg, tmp_path / "student", extra={"step": 7})
    assert path == tmp_path / "student.safetensors"
    meta = json.loads((tmp_path / "student.json").read_text())
    assert len(meta.pop("pair_id")) == 32  # also in the weights' metadata: the two files belong together
    assert meta == {"config": cfg.to_dict(), "format": "querydiff-student", "version": 1, "include_frozen": True,
                    "step": 7}
    assert any(k.startswith("backbone.") for k in load_file(str(path)))
    fresh = StandIn(cfg, seed=1)
    load_student_weights(fresh, path)
    assert_same_state(fresh, model)


def test_student_weights_get_the_same_file_mode_as_their_json(tmp_path):
    cfg = tiny_cfg()
    path = save_student(StandIn(cfg, seed=0), cfg, tmp_path / "student")
    umask = os.umask(0o022)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (tmp_path / "student.json").stat().st_mode & 0o777 == 0o666 & ~umask


def saved_without_backbone(tmp_path):
    """A stand-in student saved without its backbone, whose backbone file the config names: (model, cfg, path)."""
    reference = StandIn(tiny_cfg(), seed=0)
    dino = tmp_path / "dino.safetensors"
    save_state_file(reference.backbone.state_dict(), dino)
    cfg = tiny_cfg(str(dino))
    return reference, cfg, save_student(reference, cfg, tmp_path / "student.safetensors")


def test_student_without_backbone_tensors_reads_them_from_the_configured_checkpoint(tmp_path):
    reference, cfg, path = saved_without_backbone(tmp_path)
    assert not any(k.startswith("backbone.") for k in load_file(str(path)))
    assert json.loads((tmp_path / "student.json").read_text())["include_frozen"] is False
    fresh = StandIn(cfg, seed=1)
    load_student_weights(fresh, path)
    assert_same_state(fresh, reference)


def test_student_refuses_a_backbone_file_other_than_the_one_it_was_trained_with(tmp_path):
    reference, cfg, path = saved_without_backbone(tmp_path)
    dino = tmp_path / "dino.safetensors"
    recorded = json.loads((tmp_path / "student.json").read_text())["backbone_sha256"]
    assert recorded == hashlib.sha256(dino.read_bytes()).hexdigest()
    other = StandIn(tiny_cfg(), seed=5)  # same shapes, other weights: would load without complaint otherwise
    save_state_file(other.backbone.state_dict(), dino)
    with pytest.raises(CheckpointError, match=r"dino\.safetensors' has SHA-256 .* was trained on a backbone with "
                                              + recorded[:16]):
        load_student_weights(StandIn(cfg, seed=1), path)
    save_state_file(reference.backbone.state_dict(), dino)  # the original weights again: loads
    fresh = StandIn(cfg, seed=1)
    load_student_weights(fresh, path)
    assert_same_state(fresh, reference)


@pytest.mark.parametrize(("checkpoint", "include", "stored"), [("", False, False), ("dino.pth", True, True)])
def test_include_frozen_overrides_the_default(tmp_path, checkpoint, include, stored):
    cfg = tiny_cfg(checkpoint)
    path = save_student(StandIn(cfg, seed=0), cfg, tmp_path / "s", include_frozen=include)
    assert any(k.startswith("backbone.") for k in load_file(str(path))) is stored


def test_student_without_backbone_tensors_or_checkpoint_is_refused(tmp_path):
    cfg = tiny_cfg()
    path = save_student(StandIn(cfg, seed=0), cfg, tmp_path / "s", include_frozen=False)
    with pytest.raises(CheckpointError, match="no 'backbone.\\*' tensors.*model.backbone.checkpoint is empty"):
        load_student_weights(StandIn(cfg, seed=1), path)


def test_student_missing_and_unexpected_keys_are_listed(tmp_path):
    cfg = tiny_cfg()
    path = save_student(StandIn(cfg, seed=0), cfg, tmp_path / "s")
    with pytest.raises(CheckpointError, match=r"2 missing key\(s\): head2.bias, head2.weight"):
        load_student_weights(StandIn(cfg, seed=1, extra_head=True), path)
    path = save_student(StandIn(cfg, seed=0, extra_head=True), cfg, tmp_path / "s2")
    with pytest.raises(CheckpointError, match=r"2 unexpected key\(s\): head2.bias, head2.weight"):
        load_student_weights(StandIn(cfg, seed=1), path)


def test_student_save_is_atomic(tmp_path, monkeypatch):
    cfg = tiny_cfg()
    save_student(StandIn(cfg, seed=0), cfg, tmp_path / "s")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.safetensors"]
    before = (tmp_path / "s.safetensors").read_bytes()

    def interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_student(StandIn(cfg, seed=1), cfg, tmp_path / "s")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.safetensors"]
    assert (tmp_path / "s.safetensors").read_bytes() == before


def test_student_save_refuses_to_drop_a_trainable_backbone_parameter(tmp_path):
    cfg = tiny_cfg("dino.pth")
    model = StandIn(cfg, seed=0)
    model.backbone.norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="backbone.norm.weight"):
        save_student(model, cfg, tmp_path / "s")


def test_student_extra_cannot_replace_format_keys(tmp_path):
    cfg = tiny_cfg()
    with pytest.raises(ValueError, match="reserved"):
        save_student(StandIn(cfg, seed=0), cfg, tmp_path / "s", extra={"version": 2})


def test_missing_student_checkpoint_is_named_by_the_path_asked_for(tmp_path):
    with pytest.raises(CheckpointError, match=r"student checkpoint '.*nope\.safetensors' does not exist"):
        load_student(tmp_path / "nope.safetensors")
    cfg = tiny_cfg()
    path = save_student(StandIn(cfg, seed=0), cfg, tmp_path / "s")
    path.with_suffix(".json").unlink()  # the weights without their config
    with pytest.raises(CheckpointError, match=r"student checkpoint config '.*s\.json' does not exist"):
        load_student(path)


def test_load_student_rebuilds_the_tiny_student(tmp_path):
    from qd_core.model import build_student

    cfg = load_config("tiny")
    torch.manual_seed(0)
    model = build_student(cfg)
    path = save_student(model, cfg, tmp_path / "student", extra={"step": 3})
    loaded, loaded_cfg = load_student(path, overrides=["inference.mode=whole"])
    assert loaded_cfg.inference.mode == "whole" and loaded_cfg.model == cfg.model
    assert not loaded.training
    assert_same_state(loaded, model)


def test_load_student_refuses_overrides_that_change_the_trained_model(tmp_path):
    # Same weight shapes, other computation: this loaded cleanly and predicted something else.
    from qd_core.model import build_student

    cfg = load_config("tiny")
    path = save_student(build_student(cfg), cfg, tmp_path / "student")
    for override in ("model.backbone.num_heads=4", "model.backbone.layer_norm_eps=0.5"):
        with pytest.raises(ConfigError, match=rf"overrides may not change the model .*{override.split('=')[0]}"):
            load_student(path, overrides=[override])


def test_weights_and_json_of_two_different_saves_are_refused(tmp_path):
    # An interruption between the two atomic writes of a save pairs new weights with the old JSON.
    from qd_core.model import build_student

    cfg = load_config("tiny")
    torch.manual_seed(0)
    first = save_student(build_student(cfg), cfg, tmp_path / "a" / "student", extra={"step": 100})
    torch.manual_seed(1)
    second = save_student(build_student(cfg), cfg, tmp_path / "b" / "student", extra={"step": 200})
    first.with_suffix(".json").write_text(second.with_suffix(".json").read_text())
    with pytest.raises(CheckpointError, match="come from different saves"):
        load_student(first)
    load_student(second)


def test_load_student_reads_the_backbone_from_the_checkpoint_named_by_an_override(tmp_path):
    from qd_core.model import build_student

    torch.manual_seed(0)
    model = build_student(load_config("tiny"))
    dino = tmp_path / "dino.safetensors"
    save_state_file(model.backbone.state_dict(), dino)
    path = save_student(model, tiny_cfg(str(dino)), tmp_path / "student")
    assert not any(k.startswith("backbone.") for k in load_file(str(path)))
    moved = dino.rename(tmp_path / "moved.safetensors")
    loaded, cfg = load_student(path, overrides=[f"model.backbone.checkpoint={str(moved)!r}"])
    assert cfg.model.backbone.checkpoint == str(moved)
    assert_same_state(loaded, model)
