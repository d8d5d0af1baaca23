"""export.aoti: the tiny student compiled with AOTInductor against the eager export wrapper.

Compiling takes one to two minutes on 2 cores, so the package is built once and cached under build/pytest-aoti/,
keyed by everything that decides its contents (torch version, CPU ISA, the model and export sources, the
weights); tests/test_native.py shares it through ``tiny_aoti_package``.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from export.aoti import AotiParity, AotiSegmenter, aoti_parity, export_aoti, read_package_metadata
from export.wrapper import ExportWrapper
from qd_core import build_student, load_config

SIZE = 128
BATCH = (1, 2, 4)
ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "build" / "pytest-aoti"
# fp32 throughout; inductor fuses and reorders the reductions (softmax, einsum), which moves logits of order 1
# by ~1e-6, so 1e-4 leaves two orders of margin while a real divergence is far larger.
LOGIT_ATOL = 1e-4
MIN_AGREEMENT = 0.9999


# --------------------------------------------------------------------------------------------------------------
# Shared fixtures (imported by tests/test_native.py)
# --------------------------------------------------------------------------------------------------------------


def tiny_wrapper(seed: int = 0) -> ExportWrapper:
    """The tiny-config student with weights drawn from ``seed``, wrapped for export."""
    torch.manual_seed(seed)
    return ExportWrapper(build_student(load_config("tiny")).eval()).eval()


def _fingerprint(wrapper: nn.Module) -> str:
    """What decides the compiled package: torch, the CPU's vector ISA, the input geometry, the weights and the
    model and export sources (all of qd_core and kernels, more than the student needs, so no change is missed)."""
    digest = hashlib.sha256()
    digest.update(f"{torch.__version__} {torch.backends.cpu.get_cpu_capability()} {SIZE} {BATCH}".encode())
    sources = sorted((ROOT / "qd_core").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))
    for path in sources + [ROOT / "export" / "wrapper.py", ROOT / "export" / "aoti.py"]:
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    for name, tensor in wrapper.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def tiny_aoti_package() -> tuple[Path, ExportWrapper]:
    """(package path, eager wrapper) of the tiny student exported for 128×128, batch 1..4, on the CPU."""
    wrapper = tiny_wrapper()
    path = CACHE / f"tiny_{_fingerprint(wrapper)}.pt2"
    if not path.is_file():
        for stale in CACHE.glob("tiny_*.pt2"):
            stale.unlink(missing_ok=True)
        export_aoti(wrapper, path, height=SIZE, width=SIZE, batch=BATCH)
    return path, wrapper


def rewrite_metadata(src: Path, dst: Path, *, update: dict[str, str] | None = None,
                     drop: tuple[str, ...] = ()) -> Path:
    """Copy the package ``src`` to ``dst`` with its metadata edited, as if it had been exported elsewhere."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith("_metadata.json"):
                meta = {k: v for k, v in json.loads(data).items() if k not in drop}
                data = json.dumps({**meta, **(update or {})}).encode()
            zout.writestr(item, data)
    return dst


@pytest.fixture(scope="session")
def tiny_package() -> tuple[Path, ExportWrapper]:
    return tiny_aoti_package()


# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def segmenter(tiny_package: tuple[Path, ExportWrapper]) -> AotiSegmenter:
    return AotiSegmenter(tiny_package[0])


def images(batch: int, seed: int = 0) -> Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 255


def test_package_records_input_geometry_and_device(tiny_package: tuple[Path, ExportWrapper]) -> None:
    meta = read_package_metadata(tiny_package[0])
    assert {k: meta[k] for k in meta if k.startswith("qd.")} == {
        "qd.height": "128", "qd.width": "128", "qd.batch_min": "1", "qd.batch_opt": "2", "qd.batch_max": "4",
        "qd.num_classes": "19"}
    assert meta["AOTI_DEVICE_KEY"] == "cpu"


def test_segmenter_reports_what_the_package_accepts(segmenter: AotiSegmenter) -> None:
    assert segmenter.input_size == (SIZE, SIZE)
    assert segmenter.batch_range == (1, 4)
    assert segmenter.num_classes == 19
    assert segmenter.device == torch.device("cpu")


@pytest.mark.parametrize("batch", [1, 3])
def test_matches_the_eager_wrapper(tiny_package: tuple[Path, ExportWrapper], segmenter: AotiSegmenter,
                                   batch: int) -> None:
    x = images(batch, seed=batch)
    with torch.no_grad():
        ref_logits, ref_labels = tiny_package[1](x)
    logits, labels = segmenter.logits(x), segmenter.predict(x)
    assert logits.shape == (batch, 19, SIZE // 4, SIZE // 4) and logits.dtype == torch.float32
    assert labels.shape == (batch, SIZE, SIZE) and labels.dtype == torch.int32
    assert (logits - ref_logits).abs().max().item() <= LOGIT_ATOL
    assert (labels == ref_labels).float().mean().item() >= MIN_AGREEMENT


def test_batches_outside_the_exported_range_are_split(tiny_package: tuple[Path, ExportWrapper],
                                                      segmenter: AotiSegmenter) -> None:
    x = images(5, seed=5)  # the package takes at most 4
    with torch.no_grad():
        ref_labels = tiny_package[1](x)[1]
    labels = segmenter.predict(x)
    assert labels.shape == (5, SIZE, SIZE)
    assert (labels == ref_labels).float().mean().item() >= MIN_AGREEMENT


def test_numpy_uint8_input_gives_the_torch_result(segmenter: AotiSegmenter) -> None:
    x = images(1, seed=7).round()
    from_numpy = segmenter.logits(x.numpy().astype(np.uint8))
    assert torch.equal(from_numpy, segmenter.logits(x))


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(1, 3, 96, SIZE), r"exported for \(B, 3, 128, 128\) inputs with B >= 1, got \(1, 3, 96, 128\)"),
    (torch.zeros(0, 3, SIZE, SIZE), r"got \(0, 3, 128, 128\)"),
    (torch.zeros(1, SIZE, SIZE, 3), r"got \(1, 128, 128, 3\)"),
    (torch.zeros(1, 3, SIZE, SIZE, dtype=torch.bool), r"expected RGB values in \[0, 255\], got dtype torch.bool"),
    ([[0.0]], r"expected a torch tensor or numpy array"),
])
def test_bad_images_are_rejected(segmenter: AotiSegmenter, bad: object, message: str) -> None:
    with pytest.raises(ValueError, match=r"^images: .*" + message):
        segmenter.predict(bad)


def test_parity_measures_the_package_against_its_wrapper(tiny_package: tuple[Path, ExportWrapper],
                                                         segmenter: AotiSegmenter) -> None:
    parity = aoti_parity(tiny_package[1], segmenter, images(3, seed=11))
    assert isinstance(parity, AotiParity) and parity.num_images == 3
    assert parity.max_abs_logit_error <= LOGIT_ATOL
    assert parity.argmax_agreement >= MIN_AGREEMENT


def test_parity_exposes_a_different_model(segmenter: AotiSegmenter) -> None:
    parity = aoti_parity(tiny_wrapper(seed=1), segmenter, images(2, seed=12))
    assert parity.max_abs_logit_error > 1e-2
    assert parity.argmax_agreement < 0.9


def test_cuda_package_is_refused_without_cuda(tiny_package: tuple[Path, ExportWrapper], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    forged = rewrite_metadata(tiny_package[0], tmp_path / "cuda.pt2", update={"AOTI_DEVICE_KEY": "cuda"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^path: '.*cuda\.pt2' was compiled for CUDA, but CUDA is not available"):
        AotiSegmenter(forged)


def test_device_request_must_match_the_package(tiny_package: tuple[Path, ExportWrapper]) -> None:
    with pytest.raises(ValueError, match=r"^device: '.*' was compiled for cpu and runs only there, got "
                                         r"device='cuda'"):
        AotiSegmenter(tiny_package[0], device="cuda")


def test_package_without_input_metadata_is_refused(tiny_package: tuple[Path, ExportWrapper],
                                                   tmp_path: Path) -> None:
    foreign = rewrite_metadata(tiny_package[0], tmp_path / "foreign.pt2", drop=("qd.height",))
    with pytest.raises(ValueError, match=r"has no 'qd.height' metadata; export it with export.aoti.export_aoti"):
        AotiSegmenter(foreign)


def test_missing_or_foreign_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^path: '.*absent\.pt2' does not exist$"):
        AotiSegmenter(tmp_path / "absent.pt2")
    (tmp_path / "text.pt2").write_text("not a zip")
    with pytest.raises(ValueError, match=r"^path: '.*text\.pt2' is not a readable AOTInductor package"):
        AotiSegmenter(tmp_path / "text.pt2")


@pytest.mark.parametrize("kwargs, message", [
    ({"out_path": "student.onnx"}, r"^out_path: an AOTInductor package must end in \.pt2"),
    ({"batch": (2, 1, 4)}, r"^batch: expected 1 <= min <= opt <= max, got \(2, 1, 4\)"),
    ({"batch": (1, 4)}, r"^batch: expected three integers \(min, opt, max\)"),
    ({"height": 0}, r"^height: expected a positive integer, got 0"),
    ({"device": "mps"}, r"^device: expected 'cpu' or 'cuda'"),
])
def test_export_arguments_are_checked_before_compiling(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"out_path": "student.pt2", "height": SIZE, "width": SIZE, "batch": (1, 1, 2), "device": "cpu", **kwargs}
    args["out_path"] = tmp_path / args["out_path"]
    with pytest.raises(ValueError, match=message):
        export_aoti(nn.Identity(), **args)
    assert not any(tmp_path.iterdir())


def test_export_never_overwrites_silently(tmp_path: Path) -> None:
    (tmp_path / "student.pt2").write_text("an earlier export")
    with pytest.raises(ValueError, match=r"exists; pass overwrite=True"):
        export_aoti(nn.Identity(), tmp_path / "student.pt2", height=SIZE, width=SIZE)
    assert (tmp_path / "student.pt2").read_text() == "an earlier export"


class _LogitsOnly(nn.Module):
    def forward(self, images: Tensor) -> Tensor:
        return images.mean(dim=1, keepdim=True)


def test_export_rejects_a_wrapper_without_logits_and_labels(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^wrapper: expected outputs \(logits \(B, K, h, w\), labels \(B, H, W\)\)"):
        export_aoti(_LogitsOnly(), tmp_path / "student.pt2", height=32, width=32, batch=(1, 2, 2))
    assert not (tmp_path / "student.pt2").exists()
