"""The tiny teacher maker (train/teacher.py): a few training steps on a handful of small synthetic scenes must
write a diffusers folder that ``qd_core.teacher`` loads back, atomically, once."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file

from qd_core.data import ensure_synthetic
from qd_core.teacher import DiffusionTeacher
from train import teacher as tiny

MEAN = [123.675, 116.28, 103.53]
STD = [58.395, 57.12, 57.375]
SETTINGS = dict(seed=3, steps=4, vae_steps=3, image_size=32, batch_size=4, progress=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    # Tiny tensors: intra-op threads only add synchronisation, which dominates on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("syn"), num_train=3, num_val=1, size=(64, 128), progress=False)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    return tiny.make_tiny_teacher(tmp_path_factory.mktemp("out") / "teacher", data_root, **SETTINGS)


def test_writes_a_diffusers_folder_with_its_record(made: Path) -> None:
    for part in ("vae/config.json", "unet/config.json", "scheduler/scheduler_config.json", "empty_prompt.safetensors",
                 "README.txt", "teacher.json"):
        assert (made / part).is_file(), part
    info = json.loads((made / "teacher.json").read_text())
    assert (info["seed"], info["ddpm_steps"], info["vae_steps"], info["image_size"]) == (3, 4, 3, 32)
    assert info["tiles"] == 3 * 2  # each 1:2 scene gives two square tiles
    for key in ("first", "last", "curve"):
        assert key in info["ddpm_loss"]
    assert info["ddpm_loss"]["first"] > 0
    assert not list(made.parent.glob(".teacher.partial*")), "the temporary folder must be gone"


def test_the_folder_loads_back_as_a_teacher_with_nine_maps(made: Path) -> None:
    teacher = DiffusionTeacher.from_folder(made, pixel_mean=MEAN, pixel_std=STD)
    weak, strong = teacher(torch.randn(1, 3, 64, 64))
    # ×4 VAE → latent 16; UNet widths 32/32/64/64 → up blocks 1..3 are 64, 32, 32 wide at 4, 8, 16 px.
    expected = [(1, c, s, s) for c, s in zip([64] * 3 + [32] * 6, [4] * 3 + [8] * 3 + [16] * 3)]
    assert [tuple(m.shape) for m in weak] == expected == [tuple(m.shape) for m in strong]


def test_uses_sd_noise_schedule_and_sd_shaped_unet(made: Path) -> None:
    scheduler = json.loads((made / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["beta_schedule"], scheduler["beta_start"], scheduler["beta_end"],
            scheduler["num_train_timesteps"], scheduler["prediction_type"]) == ("scaled_linear", 0.00085, 0.012, 1000,
                                                                               "epsilon")
    unet = json.loads((made / "unet" / "config.json").read_text())
    assert len(unet["up_block_types"]) == 4 and unet["layers_per_block"] == 2
    context = load_file(str(made / "empty_prompt.safetensors"))["embedding"]
    assert tuple(context.shape) == (1, 2, unet["cross_attention_dim"])


def test_scaling_factor_gives_unit_variance_latents_on_the_training_tiles(made: Path, data_root: Path) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(made / "vae", local_files_only=True).eval()
    mean, _ = tiny.encode_tiles(vae, tiny.load_tiles(data_root, 32))
    # The factor is 1/std of exactly these posterior means; fp32 over 6·4·8·8 values.
    assert (mean * vae.config.scaling_factor).std().item() == pytest.approx(1.0, rel=1e-4)


def test_ensure_reuses_a_complete_teacher(made: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> Path:
        raise AssertionError("an existing teacher must not be remade")

    monkeypatch.setattr(tiny, "make_tiny_teacher", refuse)
    assert tiny.ensure_tiny_teacher(made, data_root, progress=False) == made


def test_ensure_remakes_a_teacher_made_from_other_scenes(tmp_path: Path, data_root: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tiny.make_tiny_teacher(tmp_path / "teacher", data_root, **SETTINGS)
    manifest = data_root / "manifest.json"
    record = json.loads(manifest.read_text())
    calls = []
    monkeypatch.setattr(tiny, "make_tiny_teacher", lambda *a, **k: calls.append(k["overwrite"]) or out)
    try:  # scenes of an older generator version: the teacher learnt other images
        manifest.write_text(json.dumps({**record, "version": record["version"] - 1}))
        assert tiny.ensure_tiny_teacher(out, data_root, progress=False) == out
    finally:
        manifest.write_text(json.dumps(record))
    assert calls == [True]
    assert tiny.ensure_tiny_teacher(out, data_root, progress=False) == out and calls == [True]  # same scenes: kept


def test_refuses_to_replace_an_existing_folder_without_overwrite(tmp_path: Path, data_root: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="taken.*overwrite"):
        tiny.make_tiny_teacher(out, data_root, **SETTINGS)
    assert (out / "keep.txt").read_text() == "x"


def test_a_failed_write_leaves_neither_output_nor_temporary_folder(tmp_path: Path, data_root: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(folder: Path, *args: object) -> None:
        folder.mkdir(parents=True)
        (folder / "vae").mkdir()
        raise OSError("disk full")

    monkeypatch.setattr(tiny, "_write_folder", fail)
    out = tmp_path / "teacher"
    with pytest.raises(OSError, match="disk full"):
        tiny.make_tiny_teacher(out, data_root, **{**SETTINGS, "steps": 1, "vae_steps": 1, "threads": 2})
    assert list(tmp_path.iterdir()) == []
    assert torch.get_num_threads() == 1, "the caller's thread count must be restored"


@pytest.mark.parametrize("argv, message", [(["--steps", "0"], "steps: expected a positive integer"),
                                           (["--image-size", "40"], "image_size: expected a multiple of 16")])
def test_cli_rejects_bad_settings_with_one_line(argv: list[str], message: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        tiny.main(["--out", str(tmp_path / "t"), "--data", str(tmp_path), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_documents_every_flag() -> None:
    parser = tiny.build_parser()
    flags = {opt for action in parser._actions for opt in action.option_strings}
    assert {"--out", "--data", "--steps", "--seed", "--overwrite"} <= flags
    assert all(action.help for action in parser._actions)
