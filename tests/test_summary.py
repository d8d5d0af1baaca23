"""Parameter and FLOP summary (used by the benchmarks for MFU)."""
import json

import pytest

from qd_core import load_config
from qd_core.summary import main, summarize


def vit_flops(tokens: int, dim: int, depth: int, patch: int) -> float:
    """2 FLOPs per MAC: qkv + proj + 2 MLP matmuls (12·D²·T) + QKᵀ and PV (2·T²·D), plus the patch conv."""
    per_block = 12 * dim * dim * tokens + 2 * tokens * tokens * dim
    patch_embed = 3 * patch * patch * dim * (tokens - 1)
    return 2.0 * (depth * per_block + patch_embed)


def test_backbone_flops_match_the_vit_formula():
    s = summarize(load_config("vitl16_512"))
    backbone = next(m for m in s["modules"] if m["name"] == "backbone")
    expected = vit_flops(1 + 32 * 32, 1024, 24, 16) / 1e9
    assert abs(backbone["gflops"] - expected) / expected < 0.01
    assert s["gflops"] > backbone["gflops"]


def test_vitl16_512_counts_backbone_frozen_rest_trainable():
    s = summarize(load_config("vitl16_512"))
    rows = {m["name"]: m for m in s["modules"]}
    assert rows["backbone"]["trainable"] == 0
    assert 300e6 < rows["backbone"]["frozen"] < 310e6  # DINOv2 ViT-L/16 at a 32x32 grid
    assert all(m["frozen"] == 0 for n, m in rows.items() if n != "backbone")
    # LoRA-Reins: 24 layers x (100x16 + 16x1024) tokens + two 1024x1024 linears + scale.
    assert rows["reins"]["trainable"] == 24 * (100 * 16 + 16 * 1024) + 2 * (1024 * 1024 + 1024) + 1


def test_cli_prints_table(capsys):
    assert main(["--config", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "backbone" in out and "total" in out and "eager operations per forward:" in out


def test_module_rows_add_up_to_the_total():
    s = summarize(load_config("tiny"))
    assert abs(sum(m["gflops"] for m in s["modules"]) - s["gflops"]) < 1e-6 * max(s["gflops"], 1)


def test_the_combine_row_is_the_students_own_work_and_the_total_a_plain_count():
    """(combine) is total minus the children, so the sum above holds by construction: pin it to what the student
    does itself (the class × mask product of the semantic logits, the Rein tokens' A·B product), and the total to
    an independent FlopCounterMode count of the same forward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from qd_core.summary import build_meta_student

    cfg = load_config("tiny")
    s = summarize(cfg)
    b, r, h = cfg.model.backbone, cfg.model.reins, cfg.model.head
    grid = (cfg.inference.window[0] // 4) * (cfg.inference.window[1] // 4)
    combine = 2 * h.num_queries * h.num_classes * grid + 2 * b.depth * r.token_length * r.lora_dim * b.embed_dim
    rows = {m["name"]: m["gflops"] for m in s["modules"]}
    assert rows["(combine)"] * 1e9 == pytest.approx(combine, rel=1e-9)
    model = build_meta_student(cfg).requires_grad_(False)
    with FlopCounterMode(display=False) as plain, torch.no_grad():
        model.semantic_logits(torch.zeros(1, 3, *cfg.inference.window, device="meta"))
    assert s["gflops"] * 1e9 == pytest.approx(plain.get_total_flops(), rel=1e-9)


@pytest.mark.parametrize("flags, named", [
    (["--height", "100", "--width", "100"], "--height 100"),
    (["--height", "-32", "--width", "64"], "--height -32"),
    (["--height", "0"], "--height 0"),  # an explicit 0 is a bad size, not the default
    (["--height", "64", "--width", "48"], "--width 48"),
])
def test_cli_refuses_an_input_size_the_forward_does_not_take(flags, named, capsys):
    assert main(["--config", "tiny", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"error: {named}: ") and captured.err.count("\n") == 1
    assert "positive multiple of 32" in captured.err


def test_cli_takes_a_non_square_multiple_of_32(capsys):
    assert main(["--config", "tiny", "--height", "64", "--width", "96", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["input"] == [1, 3, 64, 96]
