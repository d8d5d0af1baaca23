"""MSDeformAttn pixel decoder (METHOD §6.1) on the tiny config, and the sine positional encoding."""
from __future__ import annotations

import math

import pytest
import torch

from qd_core.config import load_config
from qd_core.head.msda import MSDeformAttn
from qd_core.head.pixel_decoder import MSDeformAttnPixelDecoder
from qd_core.head.position import sine_position_encoding

IN_CHANNELS = 64


def make_decoder(seed: int = 0) -> MSDeformAttnPixelDecoder:
    torch.manual_seed(seed)
    return MSDeformAttnPixelDecoder(IN_CHANNELS, load_config("tiny").model.head)


def pyramid(batch: int, height: int, width: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, IN_CHANNELS, height // s, width // s, generator=g) for s in (4, 8, 16, 32)]


@pytest.mark.parametrize("height, width", [(128, 128), (128, 192)])
def test_output_shapes(height: int, width: int) -> None:
    decoder = make_decoder()
    dim = decoder.dim
    mask_features, memories = decoder(pyramid(2, height, width))
    assert mask_features.shape == (2, dim, height // 4, width // 4)
    assert [tuple(m.shape) for m in memories] == [(2, dim, height // s, width // s) for s in (32, 16, 8)]


def test_gather_and_grid_sample_modes_agree() -> None:
    decoder = make_decoder().eval()
    feats = pyramid(2, 128, 192)
    with torch.no_grad():
        decoder.set_msda_sampling("grid_sample")
        ref_mask, ref_mem = decoder(feats)
        decoder.set_msda_sampling("gather")
        mask, mem = decoder(feats)
    assert all(m.sampling == "gather" for m in decoder.modules() if isinstance(m, MSDeformAttn))
    # fp32, two encoder layers: the two cores differ only in summation order.
    torch.testing.assert_close(mask, ref_mask, atol=1e-5, rtol=1e-5)
    for a, b in zip(mem, ref_mem):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_unknown_sampling_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="mode"):
        make_decoder().set_msda_sampling("nearest")


def test_gradients_reach_input_convs_and_sampling_offsets() -> None:
    decoder = make_decoder()
    mask_features, memories = decoder(pyramid(1, 128, 128))
    (mask_features.square().mean() + sum(m.square().mean() for m in memories)).backward()
    for i, conv_norm in enumerate(decoder.input_convs):
        assert conv_norm.conv.weight.grad is not None and conv_norm.conv.weight.grad.abs().sum() > 0, i
    for i, layer in enumerate(decoder.encoder.layers):
        grad = layer.attn.sampling_offsets.weight.grad
        assert grad is not None and grad.abs().sum() > 0, i


def test_wrong_number_of_levels_is_rejected() -> None:
    with pytest.raises(ValueError, match="feats"):
        make_decoder()(pyramid(1, 128, 128)[1:])


def test_wrong_input_width_is_rejected() -> None:
    feats = pyramid(1, 128, 128)
    feats[2] = feats[2][:, :32]
    with pytest.raises(ValueError, match=r"feats\[2\]"):
        make_decoder()(feats)


def test_position_encoding_matches_formula_on_2x3_grid() -> None:
    num_feats, h, w, temperature, eps = 4, 2, 3, 10000.0, 1e-6
    pos = sine_position_encoding(2, h, w, num_feats, device="cpu", dtype=torch.float64)
    assert pos.shape == (2, 2 * num_feats, h, w)
    expected = torch.empty(2 * num_feats, h, w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            coords = ((i + 1) / (h + eps) * 2 * math.pi, (j + 1) / (w + eps) * 2 * math.pi)  # (y, x)
            for axis, c in enumerate(coords):
                for k in range(num_feats):
                    freq = temperature ** (2 * (k // 2) / num_feats)
                    expected[axis * num_feats + k, i, j] = math.sin(c / freq) if k % 2 == 0 else math.cos(c / freq)
    # The encoding is computed in fp32 and cast: fp32 rounding of angles below 2π is ~5e-7.
    torch.testing.assert_close(pos[0], expected, atol=2e-6, rtol=0)
    torch.testing.assert_close(pos[1], expected, atol=2e-6, rtol=0)


def test_position_encoding_is_made_once_per_size_and_serves_training_after_inference() -> None:
    """The second call with the same arguments returns the encoding made by the first (no recomputation); one
    made under inference_mode must still be usable by an autograd-recorded product that saves it."""
    with torch.inference_mode():
        first = sine_position_encoding(1, 5, 7, 8, device="cpu", dtype=torch.float32)
    second = sine_position_encoding(3, 5, 7, 8, device="cpu", dtype=torch.float32)
    assert second.shape == (3, 16, 5, 7) and second.data_ptr() == first.data_ptr()
    assert sine_position_encoding(1, 5, 7, 8, device="cpu", dtype=torch.float64).data_ptr() != first.data_ptr()
    weight = torch.ones(16, 1, 1, requires_grad=True)
    (second * weight).sum().backward()  # mul saves its inputs for backward
    torch.testing.assert_close(weight.grad[:, 0, 0], second.sum(dim=(0, 2, 3)))


def test_position_encoding_rejects_odd_num_feats() -> None:
    with pytest.raises(ValueError, match="num_feats"):
        sine_position_encoding(1, 2, 3, 5)


def test_size_constants_are_bounded_in_bytes_and_keep_the_recent_ones(monkeypatch) -> None:
    """Encodings of many sizes (whole-image inference over varied images) must not pile up: beyond the byte budget
    the least recently used go, and one just used stays."""
    from qd_core import constants

    monkeypatch.setattr(constants, "_CACHE", type(constants._CACHE)())
    monkeypatch.setattr(constants, "_CACHE_BYTES", 3 * 16 * 8 * 8 * 4)  # three 16-channel 8×8 fp32 encodings
    first = sine_position_encoding(1, 8, 8, 8)
    for w in (9, 10, 11, 12):
        sine_position_encoding(1, 8, w, 8)
        assert sine_position_encoding(1, 8, 8, 8).data_ptr() == first.data_ptr()  # used again: kept
    held = sum(t.numel() * t.element_size() for t in constants._CACHE.values())
    assert held <= constants._CACHE_BYTES and len(constants._CACHE) == 2


def test_only_the_input_projections_have_a_conv_bias_and_it_starts_at_zero() -> None:
    """mmdet's MSDeformAttnPixelDecoder: ConvModule(..., bias=True) for the input convs, no bias (GroupNorm
    follows) for the lateral and output convs."""
    decoder = make_decoder()
    for conv_norm in decoder.input_convs:
        assert conv_norm.conv.bias is not None and torch.count_nonzero(conv_norm.conv.bias) == 0
    assert decoder.lateral_conv.conv.bias is None and decoder.output_conv.conv.bias is None


def test_a_student_saved_without_the_input_biases_loads_and_predicts_as_before(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from qd_core.checkpoint import CheckpointError, load_student, save_student
    from qd_core.model import build_student

    cfg = load_config("tiny", ["model.backbone.pretrain=false"])
    torch.manual_seed(0)
    model = build_student(cfg).eval()
    path = save_student(model, cfg, tmp_path / "student")
    state = load_file(str(path))
    old = {k: v for k, v in state.items()
           if not (k.startswith("pixel_decoder.input_convs.") and k.endswith(".conv.bias"))}
    assert len(state) - len(old) == 3
    save_file(old, str(path))
    loaded, _ = load_student(path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.predict_logits(x, "whole"), model.predict_logits(x, "whole"))
    del old["pixel_decoder.lateral_conv.norm.weight"]  # any other missing tensor is still refused
    save_file(old, str(path))
    with pytest.raises(CheckpointError, match="lateral_conv.norm.weight"):
        load_student(path)


def test_reference_points_are_the_pixel_centres_as_x_then_y() -> None:
    """Normalised (x, y) centres ((j + 0.5)/w, (i + 0.5)/h), row-major per level, on a non-square level."""
    from qd_core.head.pixel_decoder import DeformableEncoder

    ref = DeformableEncoder.reference_points([(2, 3), (1, 1)], torch.device("cpu"), torch.float32)
    expected = [[1 / 6, 1 / 4], [1 / 2, 1 / 4], [5 / 6, 1 / 4], [1 / 6, 3 / 4], [1 / 2, 3 / 4], [5 / 6, 3 / 4],
                [1 / 2, 1 / 2]]
    torch.testing.assert_close(ref, torch.tensor(expected), atol=1e-7, rtol=0)


def test_encoder_inputs_layers_and_fpn_step_written_out() -> None:
    """METHOD §6.1 against the module: the encoder gets the input projections of the stride-32/16/8 maps as tokens
    and their sine encodings plus each level's own embedding as positions; a layer is
    LN(x + MSDA(x + pos → x)) then LN(x + FFN(x)); the stride-4 mask features come from lateral(stride 4) +
    the upsampled stride-8 memory. Sampling offsets made non-zero (off-grid points), so the value input shows."""
    import torch.nn.functional as F

    from qd_core.head.pixel_decoder import DeformableEncoder

    decoder = make_decoder(seed=4).eval()
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for layer in decoder.encoder.layers:
            layer.attn.sampling_offsets.weight.copy_(torch.randn(layer.attn.sampling_offsets.weight.shape,
                                                                 generator=g) * 0.5)
    feats = pyramid(2, 128, 192, seed=2)
    seen: dict[str, object] = {}
    decoder.encoder.register_forward_pre_hook(lambda m, args: seen.update(inputs=args))
    decoder.encoder.register_forward_hook(lambda m, args, out: seen.update(memory=out))
    first = decoder.encoder.layers[0]
    first.register_forward_hook(lambda m, args, out: seen.update(first_out=out))
    with torch.no_grad():
        mask_features, memories = decoder(feats)
        x, pos, shapes, starts = seen["inputs"]
        assert list(shapes) == [(4, 6), (8, 12), (16, 24)]
        tokens, positions = [], []
        for lvl, f in enumerate((feats[3], feats[2], feats[1])):
            t = decoder.input_convs[lvl](f)
            h, w = t.shape[-2:]
            tokens.append(t.flatten(2).transpose(1, 2))
            sine = sine_position_encoding(2, h, w, decoder.dim // 2).flatten(2).transpose(1, 2)
            positions.append(sine + decoder.level_embed[lvl])
        torch.testing.assert_close(x, torch.cat(tokens, 1), rtol=0, atol=0)
        torch.testing.assert_close(pos, torch.cat(positions, 1), rtol=1e-6, atol=1e-6)
        # The first layer, written out from its parts.
        ref = DeformableEncoder.reference_points(shapes, x.device, torch.float32)[None, :, None].expand(
            2, -1, len(shapes), -1)
        y = first.norm1(x + first.attn(x + pos, ref, x, shapes, starts))
        torch.testing.assert_close(seen["first_out"], first.norm2(y + first.ffn(y)), rtol=1e-5, atol=1e-5)
        # The FPN step from the stride-8 memory.
        fine = memories[-1]
        assert fine.shape[-2:] == (16, 24)
        up = F.interpolate(fine, size=feats[0].shape[-2:], mode="bilinear", align_corners=False)
        expected = decoder.mask_feature(decoder.output_conv(decoder.lateral_conv(feats[0]) + up))
        torch.testing.assert_close(mask_features, expected, rtol=1e-5, atol=1e-5)
