"""Slide and whole inference (METHOD §6.4): window grid, averaging, window batches, small images."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qd_core.inference import slide_inference, whole_inference, window_grid


def method_grid(h, w, win, stride):
    """METHOD §6.4 written out: count per axis, last window clamped to the border."""
    def axis(size, win_, st):
        n = max(size - win_ + st - 1, 0) // st + 1
        out = []
        for i in range(n):
            end = min(i * st + win_, size)
            out.append((max(end - win_, 0), end))
        return out
    return [(y1, y2, x1, x2) for (y1, y2) in axis(h, win, stride) for (x1, x2) in axis(w, win, stride)]


def test_grid_matches_method_formula_on_multiples_and_non_multiples():
    for h, w in [(512, 512), (1024, 2048), (1024, 1365), (700, 1000), (853, 512)]:
        assert window_grid((h, w), (512, 512), (341, 341)) == method_grid(h, w, 512, 341)


def test_grid_counts_for_cityscapes_half_res():
    # 1024x512 (resized Cityscapes): rows (512-512+340)//341+1 = 1, cols (1024-512+340)//341+1 = 3.
    boxes = window_grid((512, 1024), (512, 512), (341, 341))
    assert len(boxes) == 3
    assert boxes[-1] == (0, 512, 512, 1024)  # last window pushed back to touch the border


def test_slide_average_equals_per_pixel_mean_of_window_outputs():
    h, w, win, st = 96, 160, (64, 64), (40, 40)
    images = torch.randn(2, 3, h, w)
    calls = []

    def fn(x):
        calls.append(x.shape[-2:])
        k = float(len(calls))  # a different constant per window makes averaging visible
        return torch.full((x.shape[0], 2, *x.shape[-2:]), k) + x[:, :1]

    out = slide_inference(fn, images, win, st, num_classes=2, multiple=32, window_batch=1)
    # Independent accumulation.
    acc = torch.zeros(2, 2, h, w)
    cnt = torch.zeros(h, w)
    for i, (y1, y2, x1, x2) in enumerate(method_grid(h, w, 64, 40)):
        acc[:, :, y1:y2, x1:x2] += float(i + 1) + images[:, :1, y1:y2, x1:x2]
        cnt[y1:y2, x1:x2] += 1
    torch.testing.assert_close(out, acc / cnt)
    assert all(tuple(s) == (64, 64) for s in calls)


@pytest.mark.parametrize("window_batch", [2, 4, 100])
def test_windows_batched_together_give_the_one_at_a_time_result(window_batch):
    """12 windows (3 × 4) of two images, in calls of up to window_batch windows × 2 images: same logits as one
    window per call (fn depends on each crop only, as the model does)."""
    h, w, win, st = 96, 160, (64, 64), (16, 32)
    images = torch.randn(2, 3, h, w)
    weight = torch.randn(5, 3, 3, 3)

    def fn(x):
        return F.conv2d(x, weight, padding=1).tanh()

    calls = []
    expected = slide_inference(fn, images, win, st, num_classes=5, multiple=32, window_batch=1)
    out = slide_inference(lambda x: calls.append(x.shape[0]) or fn(x), images, win, st, num_classes=5,
                          multiple=32, window_batch=window_batch)
    boxes = len(window_grid((h, w), win, st))
    assert boxes == 12 and sum(calls) == 2 * boxes and max(calls) == 2 * min(window_batch, boxes)
    assert len(calls) == -(-boxes // window_batch)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_window_batch_must_be_positive():
    with pytest.raises(ValueError, match="window_batch 0"):
        slide_inference(lambda x: x, torch.zeros(1, 3, 64, 64), (64, 64), (32, 32), num_classes=3, window_batch=0)


def test_image_smaller_than_window_is_padded_to_window_and_cropped_back():
    images = torch.randn(1, 3, 50, 70)
    seen = []

    def fn(x):
        seen.append(tuple(x.shape[-2:]))
        return x[:, :2] * 2

    out = slide_inference(fn, images, (64, 96), (40, 40), num_classes=2, multiple=32)
    assert seen == [(64, 96)]
    torch.testing.assert_close(out, images[:, :2] * 2)


def test_a_window_that_is_not_a_multiple_is_padded_up_to_one():
    # Window 96 with multiple 64 (patch 32): a crop smaller than the window went to the model at 96.
    seen = []

    def fn(x):
        seen.append(tuple(x.shape[-2:]))
        return x[:, :2]

    images = torch.randn(1, 3, 50, 200)
    out = slide_inference(fn, images, (96, 96), (64, 64), num_classes=2, multiple=64)
    assert seen and all(h % 64 == 0 and w % 64 == 0 for h, w in seen)
    # Each 50x96 crop is first raised to the full window, then to the multiple: 128x128, not 64x128.
    assert set(seen) == {(128, 128)}
    torch.testing.assert_close(out, images[:, :2])


def test_a_stride_beyond_the_window_is_refused_not_turned_into_nan():
    # Uncovered pixels had 0/0 logits, and the NaN argmax gave them class 0 without a word.
    with pytest.raises(ValueError, match=r"leaves pixels no window \[64, 64\] covers"):
        slide_inference(lambda x: x[:, :2], torch.zeros(1, 3, 64, 300), (64, 64), (160, 160), num_classes=2)
    from qd_core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="inference.stride"):
        load_config("tiny", ["inference.stride=[160,160]"])


def test_the_input_multiple_holds_for_a_patch_that_does_not_divide_16():
    # DINOv2's own patch 14: max(32, 28) = 32 is no multiple of 14, and every predict failed in the backbone.
    from qd_core.config import load_config
    from qd_core.model import build_student, input_size_multiple

    cfg = load_config("tiny", ["model.backbone.patch_size=14", "model.backbone.pos_grid_size=112",
                               "inference.window=[224,224]", "inference.stride=[224,224]"])
    assert input_size_multiple(cfg) == 224 and input_size_multiple(load_config("tiny")) == 32
    torch.manual_seed(0)
    model = build_student(cfg).eval()
    with torch.no_grad():
        for mode in ("whole", "slide"):
            assert model.predict(torch.randn(1, 3, 100, 120), mode=mode).shape == (1, 100, 120)


def test_whole_pads_to_multiple_and_crops():
    images = torch.randn(1, 3, 40, 70)
    seen = []

    def fn(x):
        seen.append(tuple(x.shape[-2:]))
        return x[:, :3] + 1

    out = whole_inference(fn, images, multiple=32)
    assert seen == [(64, 96)]
    torch.testing.assert_close(out, images + 1)


# ---------------------------------------------------------------------------------------------------------------
# python -m qd_core.demo: bad arguments are one "error:" line and exit code 2, before the model is built
# ---------------------------------------------------------------------------------------------------------------


def _demo_error(argv, capsys) -> str:
    """Run the demo's main, assert it refused with exit code 2, return its single stderr line."""
    from qd_core.demo import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_demo_refuses_a_generated_scene_smaller_than_32_pixels(tmp_path, capsys):
    err = _demo_error(["--size", "0", "0", "--out", str(tmp_path / "out")], capsys)
    assert "--size 0 0" in err and "at least 32" in err
    assert not (tmp_path / "out").exists()


def test_demo_refuses_an_out_that_is_a_file(tmp_path, capsys):
    taken = tmp_path / "weights.safetensors"
    taken.write_bytes(b"keep me")
    err = _demo_error(["--size", "64", "64", "--out", str(taken)], capsys)
    assert str(taken) in err and "not a folder" in err
    assert taken.read_bytes() == b"keep me"


def test_demo_says_an_image_path_is_a_directory(tmp_path, capsys):
    err = _demo_error(["--image", str(tmp_path), "--out", str(tmp_path / "out")], capsys)
    assert f"--image '{tmp_path}': is a directory" in err and "not found" not in err


def test_demo_leaves_no_temp_file_when_a_picture_cannot_be_written(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "input.png").mkdir(parents=True)  # a folder where the first picture goes: its rename fails
    err = _demo_error(["--size", "64", "64", "--out", str(out), "--overwrite"], capsys)
    assert str(out / "input.png") in err
    assert sorted(p.name for p in out.iterdir()) == ["input.png"]  # no .input.png.*.tmp left behind


def test_demo_replaces_an_earlier_runs_pictures_only_with_overwrite(tmp_path, capsys):
    from qd_core.demo import PICTURES, main

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # another file in the folder: neither refused nor touched
    argv = ["--size", "64", "64", "--out", str(out)]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([*PICTURES, "notes.txt"])
    (out / "panel.png").write_bytes(b"edited")
    capsys.readouterr()
    err = _demo_error(argv, capsys)
    assert err == (f"error: --out '{out}': holds input.png, prediction.png, labels.png, overlay.png, panel.png from "
                   f"an earlier run; pass --overwrite to replace them\n")
    assert (out / "panel.png").read_bytes() == b"edited"
    assert main(argv + ["--overwrite"]) == 0
    assert (out / "panel.png").read_bytes().startswith(b"\x89PNG") and (out / "notes.txt").read_text() == "mine"


def test_save_png_leaves_no_temp_file_when_the_rename_fails(tmp_path):
    from qd_core.visualize import save_png

    (tmp_path / "taken.png").mkdir()  # a folder where the file should go: the rename fails
    with pytest.raises(OSError):
        save_png(np.zeros((4, 4), dtype=np.uint8), tmp_path / "taken.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.png"]
