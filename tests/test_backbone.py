"""DinoVisionTransformer: numerics against transformers' Dinov2Model, position-grid resampling, adapter hook,
feature pyramid, freezing and input checks."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import Tensor

from qd_core.backbone import BackboneOutput, DinoVisionTransformer
from qd_core.config import BackboneConfig

PATCH, DIM, DEPTH, HEADS, IMAGE = 14, 64, 4, 2, 56  # stored position grid 4x4
# fp32 through 4 blocks of width 64: only the summation order differs (SDPA vs eager matmuls, fused vs split qkv),
# which moves results by ~1e-6; 1e-4 leaves room without hiding a wrong weight or a transposed grid.
ATOL = 1e-4


def hf_to_official(hf: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """Rename a transformers Dinov2Model state dict to the official DINOv2 checkpoint layout."""
    out = {
        "cls_token": hf["embeddings.cls_token"],
        "mask_token": hf["embeddings.mask_token"],
        "pos_embed": hf["embeddings.position_embeddings"],
        "patch_embed.proj.weight": hf["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf["layernorm.weight"],
        "norm.bias": hf["layernorm.bias"],
    }
    for i in range(depth):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"norm1.{kind}"] = hf[src + f"norm1.{kind}"]
            out[dst + f"norm2.{kind}"] = hf[src + f"norm2.{kind}"]
            # The official fused qkv stacks the q, k and v projections row-wise in that order.
            out[dst + f"attn.qkv.{kind}"] = torch.cat([hf[src + f"attention.{p}_proj.{kind}"] for p in "qkv"])
            out[dst + f"attn.proj.{kind}"] = hf[src + f"attention.o_proj.{kind}"]
            out[dst + f"mlp.fc1.{kind}"] = hf[src + f"mlp.fc1.{kind}"]
            out[dst + f"mlp.fc2.{kind}"] = hf[src + f"mlp.fc2.{kind}"]
        out[dst + "ls1.gamma"] = hf[src + "layer_scale1.lambda1"]
        out[dst + "ls2.gamma"] = hf[src + "layer_scale2.lambda1"]
    return out


def small_config(**changes) -> BackboneConfig:
    base = dict(patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, pos_grid_size=IMAGE)
    return BackboneConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, DinoVisionTransformer]:
    """A transformers Dinov2Model with random weights everywhere, and our backbone holding the same weights."""
    torch.manual_seed(0)
    config = transformers.Dinov2Config(
        patch_size=PATCH, hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, image_size=IMAGE,
        layerscale_value=1.0, layer_norm_eps=1e-6, attn_implementation="eager")
    hf = transformers.Dinov2Model(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lambda1" in name:  # layer scales away from 1 so that swapping ls1/ls2 would show
                p.uniform_(0.5, 1.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
        hf.embeddings.position_embeddings.mul_(5)  # position signal comparable to the patch embedding
    ours = DinoVisionTransformer(small_config())
    ours.load_state_dict(hf_to_official(hf.state_dict(), DEPTH), strict=True)
    return hf, ours


# --------------------------------------------------------------------------------------------------------------
# Independent reference of DINOv2's position-grid resampling
# --------------------------------------------------------------------------------------------------------------


def keys_cubic(x: float, a: float = -0.75) -> float:
    """Keys' cubic convolution kernel with PyTorch's a = -0.75."""
    x = abs(x)
    if x <= 1:
        return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
    if x < 2:
        return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
    return 0.0


def cubic_matrix(n_in: int, n_out: int, scale: float) -> np.ndarray:
    """(n_out, n_in) resampling weights: output i reads source (i + 0.5) / scale - 0.5, borders repeated."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) / scale - 0.5
        base = math.floor(src)
        for j in range(base - 1, base + 3):
            m[i, min(max(j, 0), n_in - 1)] += keys_cubic(src - j)
    return m


def dinov2_pos_reference(pos: Tensor, h: int, w: int) -> Tensor:
    """DINOv2's recipe written out: scale factors ((h + 0.1) / g, (w + 0.1) / g), separable bicubic, float64."""
    d = pos.shape[-1]
    g = math.isqrt(pos.shape[1] - 1)
    grid = pos[0, 1:].detach().double().numpy().reshape(g, g, d)
    rows, cols = cubic_matrix(g, h, (h + 0.1) / g), cubic_matrix(g, w, (w + 0.1) / g)
    patches = np.einsum("ia,jb,abd->ijd", rows, cols, grid).reshape(h * w, d)
    return torch.cat([pos[0, :1].detach().double(), torch.from_numpy(patches)])[None].float()


# --------------------------------------------------------------------------------------------------------------
# Numerics against transformers
# --------------------------------------------------------------------------------------------------------------


def test_matches_transformers_at_the_stored_size(pair):
    hf, ours = pair
    images = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(pixel_values=images, output_hidden_states=True)
        out = ours(images)
        tokens = ours.prepare_tokens(images)
    torch.testing.assert_close(tokens, ref.hidden_states[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.layers[1], ref.hidden_states[2][:, 1:], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.final, ref.last_hidden_state, atol=ATOL, rtol=0)


def test_matches_transformers_on_a_non_square_input_with_dinov2_position_resampling(pair, monkeypatch):
    # transformers resamples the position grid to an output *size*; DINOv2 (which the checkpoints were trained
    # with) uses the *scale factor* (n + 0.1) / g, which moves the sample points. Give transformers DINOv2's grid
    # so that everything else (token order on a 5x7 grid, blocks, norm) is compared.
    hf, ours = pair
    images = torch.randn(2, 3, 70, 98, generator=torch.Generator().manual_seed(2))
    pos = hf.embeddings.position_embeddings
    monkeypatch.setattr(hf.embeddings, "interpolate_pos_encoding",
                        lambda emb, height, width: dinov2_pos_reference(pos, height // PATCH, width // PATCH))
    with torch.no_grad():
        ref = hf(pixel_values=images, output_hidden_states=True)
        out = ours(images)
    assert out.grid == (5, 7)
    torch.testing.assert_close(out.layers[2], ref.hidden_states[3][:, 1:], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.final, ref.last_hidden_state, atol=ATOL, rtol=0)


@pytest.mark.parametrize("grid", [(5, 7), (4, 7), (6, 6), (3, 2)])
def test_position_grid_is_resampled_with_the_dinov2_offset(pair, grid):
    _, ours = pair
    with torch.no_grad():
        got = ours.interpolate_pos_embed(*grid)
    # fp32 bicubic against a float64 reference: a few ulps of values of size ~1.
    torch.testing.assert_close(got, dinov2_pos_reference(ours.pos_embed, *grid), atol=1e-5, rtol=0)


def test_half_precision_backbone_resamples_the_position_grid_in_fp32():
    torch.manual_seed(0)
    backbone = DinoVisionTransformer(small_config()).half()
    with torch.no_grad():
        backbone.pos_embed.normal_(0, 1)
        got = backbone.interpolate_pos_embed(5, 7)
    # fp16 bicubic would be off by ~1e-3; computed in fp32 from the fp16-stored grid it is a few fp32 ulps.
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, dinov2_pos_reference(backbone.pos_embed, 5, 7), atol=1e-5, rtol=0)


def test_position_grid_is_used_unchanged_at_the_stored_size(pair):
    _, ours = pair
    assert torch.equal(ours.interpolate_pos_embed(4, 4), ours.pos_embed)


# --------------------------------------------------------------------------------------------------------------
# Adapter hook and outputs
# --------------------------------------------------------------------------------------------------------------


def test_adapter_runs_after_every_block_and_its_output_is_kept(pair):
    _, ours = pair
    calls: list[tuple[int, Tensor]] = []

    def adapter(tokens: Tensor, layer: int) -> Tensor:
        shifted = tokens + 0.5 * (layer + 1)
        calls.append((layer, shifted))
        return shifted

    with torch.no_grad():
        out = ours(torch.randn(1, 3, IMAGE, IMAGE), adapter=adapter)
    assert [layer for layer, _ in calls] == list(range(DEPTH))
    for (_, shifted), tap in zip(calls, out.layers):
        assert torch.equal(tap, shifted[:, 1:])


def test_final_output_is_normed_but_the_taps_are_not(pair):
    _, ours = pair
    last: list[Tensor] = []
    with torch.no_grad():
        out = ours(torch.randn(1, 3, IMAGE, IMAGE), adapter=lambda t, i: last.append(t) or t)
    torch.testing.assert_close(out.final, ours.norm(last[-1]), atol=0, rtol=0)
    assert torch.equal(out.layers[-1], last[-1][:, 1:])
    assert not torch.allclose(out.layers[-1], out.final[:, 1:], atol=1e-2)


# --------------------------------------------------------------------------------------------------------------
# Pyramid
# --------------------------------------------------------------------------------------------------------------


def tiny_backbone(**changes) -> DinoVisionTransformer:
    base = dict(patch_size=16, embed_dim=16, depth=4, num_heads=2, pos_grid_size=64)
    return DinoVisionTransformer(BackboneConfig(**{**base, **changes}))


def test_pyramid_levels_have_strides_4_8_16_32():
    backbone = tiny_backbone()
    images = torch.randn(2, 3, 64, 128)
    with torch.no_grad():
        maps = backbone.pyramid(backbone(images))
    assert [tuple(m.shape) for m in maps] == [(2, 16, 16, 32), (2, 16, 8, 16), (2, 16, 4, 8), (2, 16, 2, 4)]
    assert [(64 // m.shape[-2], 128 // m.shape[-1]) for m in maps] == [(4, 4), (8, 8), (16, 16), (32, 32)]


@pytest.mark.parametrize(("depth", "explicit", "taps"), [(24, [], [7, 11, 15, 23]), (12, [], [3, 5, 7, 11]),
                                                         (8, [], [2, 3, 4, 7]), (8, [0, 2, 5, 6], [0, 2, 5, 6])])
def test_pyramid_reads_the_blocks_named_by_out_indices(depth, explicit, taps):
    backbone = tiny_backbone(depth=depth, out_indices=explicit)
    # Layer i holds the constant i, which bilinear resampling preserves: each level names its source block.
    layers = [torch.full((1, 6, 16), float(i)) for i in range(depth)]
    maps = backbone.pyramid(BackboneOutput(layers=layers, grid=(2, 3), final=torch.zeros(1, 7, 16)))
    for level, tap in zip(maps, taps):
        torch.testing.assert_close(level, torch.full_like(level, float(tap)), atol=1e-6, rtol=0)


def test_pyramid_stride_16_level_is_the_tap_and_stride_32_is_bilinear_halving():
    backbone = tiny_backbone()
    layers = [torch.randn(2, 4 * 6, 16) for _ in range(4)]
    maps = backbone.pyramid(BackboneOutput(layers=layers, grid=(4, 6), final=torch.zeros(2, 25, 16)))
    tap2 = layers[2].transpose(1, 2).reshape(2, 16, 4, 6)
    tap3 = layers[3].transpose(1, 2).reshape(2, 16, 4, 6)
    assert torch.equal(maps[2], tap2)
    # Bilinear x0.5 with half-pixel centres samples exactly between two pixels per axis: a 2x2 mean.
    torch.testing.assert_close(maps[3], F.avg_pool2d(tap3, 2), atol=1e-6, rtol=0)


def test_pyramid_stride_4_and_8_levels_are_bilinear_upsampling_with_half_pixel_centres():
    backbone = tiny_backbone()
    layers = [torch.randn(2, 4 * 6, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    maps = backbone.pyramid(BackboneOutput(layers=layers, grid=(4, 6), final=torch.zeros(2, 25, 16)))
    for level, scale in ((0, 4), (1, 2)):
        tap = layers[level].transpose(1, 2).reshape(2, 16, 4, 6)
        expected = F.interpolate(tap, scale_factor=scale, mode="bilinear", align_corners=False)
        torch.testing.assert_close(maps[level], expected, atol=1e-5, rtol=0)


def test_layer_norms_use_dinov2s_eps():
    """DINOv2 builds its LayerNorms with eps 1e-6, not PyTorch's 1e-5 (the transformers comparison's 1e-4
    tolerance would not see the difference)."""
    assert BackboneConfig().layer_norm_eps == 1e-6
    norms = [m for m in tiny_backbone().modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 4 + 1 and all(m.eps == 1e-6 for m in norms)


def test_random_init_follows_dinov2():
    """Used when the tiny config's stand-in backbone is pretrained from scratch: LayerScale 1e-5 (METHOD §2.1),
    trunc-normal(0.02) position embedding and Linear weights, zero Linear biases."""
    assert BackboneConfig().layerscale_init == 1e-5
    torch.manual_seed(0)
    backbone = DinoVisionTransformer(BackboneConfig(patch_size=16, embed_dim=64, depth=2, num_heads=2,
                                                    pos_grid_size=128))
    gammas = [p for n, p in backbone.named_parameters() if n.endswith("gamma")]
    assert len(gammas) == 4 and all(torch.all(g == 1e-5) for g in gammas)
    assert backbone.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)
    qkv = backbone.blocks[0].attn.qkv
    assert qkv.weight.std().item() == pytest.approx(0.02, rel=0.1) and torch.all(qkv.bias == 0)


# --------------------------------------------------------------------------------------------------------------
# Frozen
# --------------------------------------------------------------------------------------------------------------


def test_parameters_are_frozen_and_train_keeps_eval_mode():
    backbone = tiny_backbone()
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not any(m.training for m in backbone.modules())
    parent = torch.nn.Sequential(backbone)
    parent.train()
    assert parent.training and not any(m.training for m in backbone.modules())


def test_gradients_flow_through_the_frozen_backbone_to_an_adapter():
    backbone = tiny_backbone()
    bias = torch.zeros(16, requires_grad=True)
    out = backbone(torch.randn(1, 3, 64, 64), adapter=lambda t, i: t + bias if i == 0 else t)
    out.layers[-1].square().sum().backward()
    # The bias enters after block 0; its gradient reaches it only through blocks 1..3.
    assert bias.grad is not None and bias.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.parameters())


# --------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("images", "expected"), [
    (torch.randn(3, 64, 64), "4-D float tensor"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "4-D float tensor"),
    (torch.randn(1, 1, 64, 64), "3 channels"),
    (torch.randn(1, 3, 60, 64), "multiples of patch_size 16"),
    (torch.randn(1, 3, 64, 72), "multiples of patch_size 16"),
])
def test_bad_images_raise_a_value_error_naming_the_shape(images, expected):
    backbone = tiny_backbone()
    with pytest.raises(ValueError, match=re.escape(expected)) as info:
        backbone(images)
    assert str(tuple(images.shape)) in str(info.value)
