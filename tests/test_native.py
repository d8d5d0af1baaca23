"""qd_infer, the C++ runner: built once per session with CMake (into build/pytest-native/, incrementally), then run
on the tiny student's AOTInductor package from tests/test_aoti.py.

The build needs cmake, a C++20 compiler and the libpng / libjpeg development files (Debian: cmake g++ libpng-dev
libjpeg62-turbo-dev). When they are missing every test here fails with CMake's message; nothing is skipped.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from bench.native import NativeError, build_qd_infer, tail
from export.aoti import AotiSegmenter
from export.wrapper import ExportWrapper
from qd_core.data.synthetic import ensure_synthetic, image_path
from qd_core.data.transforms import resize_image
from qd_core.visualize import colorize
from test_aoti import MIN_AGREEMENT, SIZE, rewrite_metadata, tiny_aoti_package

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "pytest-native"
# Source-domain scenes and three shifted domains, so the check covers more than one appearance.
EVAL_IMAGES = (("source", 0), ("source", 1), ("fog", 0), ("night", 1), ("snow", 0))


@dataclass(frozen=True)
class NativeBuild:
    exe: Path
    configure_log: str


@pytest.fixture(scope="session")
def native() -> NativeBuild:
    try:
        exe, configure_log = build_qd_infer(BUILD)
    except NativeError as e:
        pytest.fail(str(e))
    return NativeBuild(exe, configure_log)


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_qd_infer(native: NativeBuild, *args: str | Path, env: dict[str, str] | None = None) -> Result:
    # One thread: the CI machine has two cores, and OpenMP threads that wait on each other under load turn
    # milliseconds into seconds.
    proc = subprocess.run([str(native.exe), *map(str, args), "--threads", "1"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})
    return Result(proc.returncode, proc.stdout, proc.stderr)


def read_labels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "L", f"{path}: expected an 8-bit grey label PNG, got mode {im.mode}"
        return np.asarray(im)


def agreement(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    return float((np.asarray(a, dtype=np.int64) == np.asarray(b, dtype=np.int64)).mean())


@dataclass(frozen=True)
class EvalSet:
    folder: Path  # the PNGs qd_infer reads
    names: list[str]
    images: torch.Tensor  # (N, 3, 128, 128) float RGB in [0, 255], as decoded by Pillow


@pytest.fixture(scope="session")
def eval_set(tmp_path_factory: pytest.TempPathFactory) -> EvalSet:
    """Synthetic evaluation scenes (128×256) centre-cropped to the package's 128×128."""
    root = ensure_synthetic(tmp_path_factory.mktemp("synthetic"), num_train=1, num_val=2, size=(SIZE, 2 * SIZE),
                            progress=False)
    folder = tmp_path_factory.mktemp("eval_images")
    names, arrays = [], []
    for domain, index in EVAL_IMAGES:
        with Image.open(image_path(root, domain, "val", index)) as im:
            crop = np.asarray(im.convert("RGB"))[:, SIZE // 2: SIZE // 2 + SIZE]
        name = f"{domain}_{index}.png"
        Image.fromarray(crop).save(folder / name)
        names.append(name)
        arrays.append(crop)
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return EvalSet(folder, names, images)


@pytest.fixture(scope="session")
def package() -> tuple[Path, ExportWrapper]:
    return tiny_aoti_package()


@pytest.fixture(scope="session")
def references(package: tuple[Path, ExportWrapper], eval_set: EvalSet) -> dict[str, np.ndarray]:
    """Label maps (N, 128, 128) of the eval set from the eager wrapper and from AotiSegmenter."""
    with torch.no_grad():
        eager = package[1](eval_set.images)[1].numpy()
    aoti = AotiSegmenter(package[0]).predict(eval_set.images).numpy()
    return {"eager": eager, "aoti": aoti}


@pytest.fixture(scope="session")
def batch_runs(native: NativeBuild, package: tuple[Path, ExportWrapper], eval_set: EvalSet,
               tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Result, Path]]:
    """qd_infer over the eval set at batch 1 and at batch 3 (5 images: a full batch, then a partial one)."""
    runs = {}
    for batch in (1, 3):
        out = tmp_path_factory.mktemp(f"qd_infer_batch{batch}")
        runs[batch] = (run_qd_infer(native, "--model", package[0], "--images", eval_set.folder, "--out", out,
                                    "--batch", str(batch), "--warmup", "1", "--iters", "2"), out)
    return runs


# --------------------------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------------------------


def test_ctest_suite_passes(native: NativeBuild) -> None:
    proc = subprocess.run(["ctest", "--output-on-failure"], cwd=BUILD, capture_output=True, text=True)
    assert proc.returncode == 0, tail(proc.stdout + proc.stderr, 60)


def test_build_uses_the_cxx_abi_of_the_torch_wheel(native: NativeBuild) -> None:
    abi = int(torch.compiled_with_cxx11_abi())
    assert f"C++ ABI _GLIBCXX_USE_CXX11_ABI={abi}" in native.configure_log


def test_configure_says_which_backends_it_built(native: NativeBuild) -> None:
    assert "qd_infer backend AOTInductor (.pt2): built" in native.configure_log
    assert re.search(r"qd_infer backend TensorRT \(\.engine\): (built|skipped: .+)", native.configure_log)


# --------------------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3])
def test_labels_match_aoti_segmenter_and_pytorch(batch_runs: dict[int, tuple[Result, Path]], eval_set: EvalSet,
                                                 references: dict[str, np.ndarray], batch: int) -> None:
    result, out = batch_runs[batch]
    assert result.returncode == 0, result.stderr
    labels = np.stack([read_labels(out / name) for name in eval_set.names])
    assert labels.shape == (len(eval_set.names), SIZE, SIZE)
    assert agreement(labels, references["aoti"]) >= MIN_AGREEMENT
    assert agreement(labels, references["eager"]) >= MIN_AGREEMENT


def test_colour_masks_use_the_cityscapes_palette(batch_runs: dict[int, tuple[Result, Path]],
                                                 eval_set: EvalSet) -> None:
    _, out = batch_runs[1]
    for name in eval_set.names:
        stem = Path(name).stem
        with Image.open(out / f"{stem}_color.png") as im:
            assert im.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(im), colorize(read_labels(out / f"{stem}.png")))


def test_prints_per_image_lines_and_latency_percentiles(batch_runs: dict[int, tuple[Result, Path]],
                                                        eval_set: EvalSet) -> None:
    result, _ = batch_runs[3]
    for i, name in enumerate(sorted(eval_set.names), start=1):  # qd_infer goes through the folder by name
        assert re.search(rf"^\[{i}/5\] {re.escape(name)} 128x128 -> .* ms \(batch of [23]\)$", result.stdout, re.M)
    summary = re.search(r"per batch p50 ([\d.]+) ms p90 ([\d.]+) ms \| per image p50 ([\d.]+) ms p90 ([\d.]+) ms \| "
                        r"[\d.]+ images/s \(4 timed runs, batch 3", result.stdout)
    assert summary, result.stdout
    batch_p50, batch_p90, image_p50, image_p90 = map(float, summary.groups())
    assert 0 < batch_p50 <= batch_p90 and 0 < image_p50 <= image_p90
    assert "wrote 5 of 5 images" in result.stdout


def test_jpeg_input(native: NativeBuild, package: tuple[Path, ExportWrapper], eval_set: EvalSet,
                    tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    Image.fromarray(eval_set.images[0].permute(1, 2, 0).byte().numpy()).save(tmp_path / "in" / "scene.jpg",
                                                                              quality=95)
    result = run_qd_infer(native, "--model", package[0], "--images", tmp_path / "in", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    # Pillow and qd_infer both decode with libjpeg(-turbo)'s default (islow) IDCT, so the pixels, and therefore
    # the labels, are the same.
    with Image.open(tmp_path / "in" / "scene.jpg") as im:
        decoded = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        expected = package[1](decoded)[1][0]
    assert agreement(read_labels(tmp_path / "out" / "scene.png"), expected) >= MIN_AGREEMENT


def test_cmyk_jpeg_and_16_bit_png_decode_as_the_python_side_reads_them(native: NativeBuild,
                                                                        package: tuple[Path, ExportWrapper],
                                                                        eval_set: EvalSet, tmp_path: Path) -> None:
    from qd_core.data.files import read_image

    (tmp_path / "in").mkdir()
    rgb = eval_set.images[0].permute(1, 2, 0).byte().numpy()
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "in" / "print.jpg", quality=95)  # Adobe-inverted CMYK
    grey = np.asarray(Image.fromarray(rgb).convert("L")).astype(np.uint16) * 257
    Image.fromarray(grey).save(tmp_path / "in" / "deep.png")  # 16-bit grey
    result = run_qd_infer(native, "--model", package[0], "--images", tmp_path / "in", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    for name in ("print.jpg", "deep.png"):
        decoded = torch.from_numpy(read_image(tmp_path / "in" / name)).permute(2, 0, 1)[None].float()
        with torch.no_grad():
            expected = package[1](decoded)[1][0]
        assert agreement(read_labels(tmp_path / "out" / f"{Path(name).stem}.png"), expected) >= MIN_AGREEMENT, name


def test_images_of_another_size_are_resized_both_ways(native: NativeBuild, package: tuple[Path, ExportWrapper],
                                                      eval_set: EvalSet, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    scene = eval_set.images[1:2]
    small = torch.cat([scene, scene.flip(-1)], dim=-1)[:, :, :96, :160]  # (1, 3, 96, 160)
    Image.fromarray(small[0].permute(1, 2, 0).byte().numpy()).save(tmp_path / "in" / "wide.png")
    result = run_qd_infer(native, "--model", package[0], "--images", tmp_path / "in", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    # The documented behaviour: the Python side's bilinear resize of the uint8 pixels to the model's size, nearest
    # back.
    resized = resize_image(small[0].permute(1, 2, 0).byte().numpy(), (SIZE, SIZE))
    resized = torch.from_numpy(resized).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        labels = package[1](resized)[1][None].float()
    expected = F.interpolate(labels, size=(96, 160), mode="nearest")[0, 0]
    labels_out = read_labels(tmp_path / "out" / "wide.png")
    assert labels_out.shape == (96, 160)
    assert agreement(labels_out, expected) >= MIN_AGREEMENT
    # The same compiled model on the same resized pixels: the labels AotiSegmenter gives in Python, to the pixel.
    aoti = AotiSegmenter(package[0]).predict(resized)[None].float()
    assert np.array_equal(labels_out, F.interpolate(aoti, size=(96, 160), mode="nearest")[0, 0].numpy())


class RedChannelProbe(torch.nn.Module):
    """A stand-in model whose label map is the red channel of its input, rounded: it shows which pixel values
    qd_infer hands a model. Logits are zeros of the package's usual shape."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.zeros(x.shape[0], 2, x.shape[2] // 4, x.shape[3] // 4, dtype=x.dtype, device=x.device)
        return logits + x[:, :1, ::4, ::4] * 0, x[:, 0].round().to(torch.int32)


@pytest.fixture(scope="session")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The AOTInductor package of RedChannelProbe at the tiny package's size, batch 1."""
    from export.aoti import export_aoti

    return export_aoti(RedChannelProbe(), tmp_path_factory.mktemp("probe") / "probe.pt2", height=SIZE, width=SIZE,
                       batch=(1, 1, 1))


def test_the_model_sees_the_python_sides_resized_pixels(native: NativeBuild, probe: Path, tmp_path: Path) -> None:
    """Resizing must give the model the very values qd_core.data.transforms.resize_image gives it in training,
    evaluation and export.infer (whole grey levels, OpenCV-like fixed point), not an fp32 interpolation."""
    (tmp_path / "in").mkdir()
    rng = np.random.default_rng(0)
    # Shrinking and enlarging, each axis at its own ratio; random pixels so every interpolation weight shows.
    sizes = {"wide": (80, 200), "tall": (300, 90)}
    pixels = {name: rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for name, hw in sizes.items()}
    for name, rgb in pixels.items():
        Image.fromarray(rgb).save(tmp_path / "in" / f"{name}.png")
    result = run_qd_infer(native, "--model", probe, "--images", tmp_path / "in", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    for name, rgb in pixels.items():
        seen = torch.from_numpy(resize_image(rgb, (SIZE, SIZE))[..., 0].copy())[None, None]
        expected = F.interpolate(seen, size=sizes[name], mode="nearest")[0, 0].numpy()
        np.testing.assert_array_equal(read_labels(tmp_path / "out" / f"{name}.png"), expected, err_msg=name)


def test_a_jpeg_is_turned_upright_by_its_exif_orientation_as_the_python_side_reads_it(native: NativeBuild,
                                                                                     probe: Path,
                                                                                     tmp_path: Path) -> None:
    """Phone photos are stored sideways with an EXIF orientation: qd_infer must segment them the way
    qd_core.data.files.read_image (and OpenCV) turn them, and write labels of the upright size."""
    from qd_core.data.files import read_image

    rng = np.random.default_rng(1)
    (tmp_path / "in").mkdir()
    # Smooth content (JPEG keeps it nearly intact) that differs under every flip and turn.
    y, x = np.mgrid[0:48, 0:80]
    red = (y * 5 + x * 2 + rng.integers(0, 3, (48, 80))).clip(0, 255).astype(np.uint8)
    pixels = np.stack([red, red // 2, 255 - red], axis=-1)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(pixels).save(tmp_path / "in" / f"o{orientation}.jpg", exif=exif.tobytes(), quality=95)
    result = run_qd_infer(native, "--model", probe, "--images", tmp_path / "in", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    for orientation in range(1, 9):
        upright = read_image(tmp_path / "in" / f"o{orientation}.jpg")
        seen = torch.from_numpy(resize_image(upright, (SIZE, SIZE))[..., 0].copy())[None, None]
        expected = F.interpolate(seen, size=upright.shape[:2], mode="nearest")[0, 0].numpy().astype(int)
        got = read_labels(tmp_path / "out" / f"o{orientation}.png").astype(int)
        assert got.shape == expected.shape, orientation
        # libjpeg here and Pillow's own may round a few samples apart; a wrong turn is off by tens of levels.
        assert np.abs(got - expected).max() <= 2, (orientation, np.abs(got - expected).max())


# --------------------------------------------------------------------------------------------------------------
# Bad input: one error line each, non-zero exit
# --------------------------------------------------------------------------------------------------------------


def single_error(result: Result) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("qd_infer: error: ")
    return lines[0]


def test_corrupt_image_is_reported_and_the_others_are_written(native: NativeBuild,
                                                              package: tuple[Path, ExportWrapper],
                                                              eval_set: EvalSet, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in eval_set.names[:2]:
        shutil.copy(eval_set.folder / name, folder / name)
    whole = (eval_set.folder / eval_set.names[2]).read_bytes()
    (folder / "broken.png").write_bytes(whole[: len(whole) // 2])
    result = run_qd_infer(native, "--model", package[0], "--images", folder, "--out", tmp_path / "out",
                          "--batch", "2")
    assert result.returncode == 1
    assert re.fullmatch(r"qd_infer: error: .*/broken\.png: damaged PNG data \(libpng: .+\)", single_error(result))
    for name in eval_set.names[:2]:
        assert (tmp_path / "out" / name).is_file()
        assert (tmp_path / "out" / f"{Path(name).stem}_color.png").is_file()
    assert not (tmp_path / "out" / "broken.png").exists()
    assert "wrote 2 of 3 images" in result.stdout


def test_empty_folder(native: NativeBuild, package: tuple[Path, ExportWrapper], tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    result = run_qd_infer(native, "--model", package[0], "--images", tmp_path / "in", "--out", tmp_path / "out")
    assert re.fullmatch(r"qd_infer: error: --images: no PNG or JPEG images in '.*/in'", single_error(result))


def test_missing_model(native: NativeBuild, eval_set: EvalSet, tmp_path: Path) -> None:
    result = run_qd_infer(native, "--model", tmp_path / "student.pt2", "--images", eval_set.folder,
                          "--out", tmp_path / "out")
    assert re.fullmatch(r"qd_infer: error: --model: '.*/student\.pt2' does not exist", single_error(result))


def test_cuda_package_is_refused_without_a_cuda_device(native: NativeBuild, package: tuple[Path, ExportWrapper],
                                                       eval_set: EvalSet, tmp_path: Path) -> None:
    forged = rewrite_metadata(package[0], tmp_path / "cuda.pt2", update={"AOTI_DEVICE_KEY": "cuda"})
    # Hiding every GPU makes the check independent of the machine the test runs on.
    result = run_qd_infer(native, "--model", forged, "--images", eval_set.folder, "--out", tmp_path / "out",
                          env={"CUDA_VISIBLE_DEVICES": ""})
    assert re.fullmatch(r"qd_infer: error: '.*/cuda\.pt2' was compiled for CUDA, but no CUDA device is available "
                        r"to qd_infer here .*", single_error(result))
    assert not (tmp_path / "out").exists()


def test_package_for_another_machine_is_refused(native: NativeBuild, package: tuple[Path, ExportWrapper],
                                                eval_set: EvalSet, tmp_path: Path) -> None:
    forged = rewrite_metadata(package[0], tmp_path / "other.pt2", update={"AOTI_PLATFORM": "win32"})
    result = run_qd_infer(native, "--model", forged, "--images", eval_set.folder, "--out", tmp_path / "out")
    assert re.fullmatch(r"qd_infer: error: '.*/other\.pt2' was compiled for win32/\w+, this machine is linux/\w+",
                        single_error(result))


def test_batch_outside_the_exported_range(native: NativeBuild, package: tuple[Path, ExportWrapper],
                                          eval_set: EvalSet, tmp_path: Path) -> None:
    result = run_qd_infer(native, "--model", package[0], "--images", eval_set.folder, "--out", tmp_path / "out",
                          "--batch", "5")
    assert single_error(result) == "qd_infer: error: --batch 5: the model takes batches of 1 to 4 images"


def test_existing_outputs_are_kept_without_overwrite(native: NativeBuild, package: tuple[Path, ExportWrapper],
                                                     eval_set: EvalSet, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    shutil.copy(eval_set.folder / eval_set.names[0], tmp_path / "in" / "a.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.png").write_bytes(b"earlier result")
    args = ("--model", package[0], "--images", tmp_path / "in", "--out", tmp_path / "out")
    result = run_qd_infer(native, *args)
    assert re.fullmatch(r"qd_infer: error: --out: '.*/a\.png' exists; pass --overwrite to replace it",
                        single_error(result))
    assert (tmp_path / "out" / "a.png").read_bytes() == b"earlier result"
    assert run_qd_infer(native, *args, "--overwrite").returncode == 0
    assert read_labels(tmp_path / "out" / "a.png").shape == (SIZE, SIZE)


def test_timings_file_lists_every_timed_pass(native: NativeBuild, package: tuple[Path, ExportWrapper],
                                             eval_set: EvalSet, tmp_path: Path) -> None:
    timings = tmp_path / "timings.json"
    result = run_qd_infer(native, "--model", package[0], "--images", eval_set.folder, "--out", tmp_path / "out",
                          "--batch", "3", "--warmup", "0", "--iters", "2", "--timings", timings)
    assert result.returncode == 0, result.stderr
    data = json.loads(timings.read_text())
    assert (data["batch"], data["threads"], data["warmup"]) == (3, 1, 0)
    # 5 images at batch 3: a full batch then a partial one, each timed twice
    assert [images for _, images in data["runs"]] == [3, 3, 2, 2]
    assert all(ms > 0 for ms, _ in data["runs"])


def test_native_segmenter_predicts_like_aoti_and_times_each_pass(native: NativeBuild,
                                                                 package: tuple[Path, ExportWrapper],
                                                                 eval_set: EvalSet,
                                                                 references: dict[str, np.ndarray]) -> None:
    from bench.native import NativeSegmenter

    seg = NativeSegmenter(native.exe, package[0], threads=1)
    labels = seg.predict(eval_set.images[:3])
    assert agreement(labels, references["aoti"][:3]) >= MIN_AGREEMENT
    assert len(seg.timed_passes(eval_set.images[:1], warmup=1, iters=3)) == 3
    with pytest.raises(ValueError, match="whole numbers"):
        seg.predict(eval_set.images[:1] + 0.5)
