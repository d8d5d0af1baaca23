"""Specification of the masked-attention transformer decoder (METHOD §6.2) and of the mask rule it relies on.

Tensors are fp32 with O(1) values; attention outputs are convex combinations of values computed from dot
products of ≤ 64 terms, so two independent fp32 computations agree to ~1e-6. Tolerances are 1e-5 (1e-4 for
mask logits, which are sums of 64 products of unit-variance numbers and so of magnitude ~8).
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from qd_core.attention import masked_attention
from qd_core.config import HeadConfig, load_config
from qd_core.head.decoder import MaskedAttentionDecoder, resized_mask_features
from qd_core.head.position import sine_position_encoding
from qd_core.layers import MultiheadAttention

ATOL = 1e-5
MASK_SIZE = (32, 32)
MEMORY_SIZES = [(4, 4), (8, 8), (16, 16)]  # strides 32, 16, 8 of a 128×128 image


@pytest.fixture(autouse=True)
def _torch_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QD_ATTENTION", "torch")


def head_cfg(**changes: object) -> HeadConfig:
    return dataclasses.replace(load_config("tiny").model.head, **changes)


def inputs(cfg: HeadConfig, batch: int = 2, seed: int = 0) -> tuple[Tensor, list[Tensor], Tensor]:
    g = torch.Generator().manual_seed(seed)
    d = cfg.dim
    mask_features = torch.randn(batch, d, *MASK_SIZE, generator=g)
    memories = [torch.randn(batch, d, h, w, generator=g) for h, w in MEMORY_SIZES]
    query_pos = torch.randn(batch, cfg.num_queries, d, generator=g)
    return mask_features, memories, query_pos


def mask2former_blocked(mask_logits: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Mask2Former's attention mask from full-resolution mask logits (B, Q, H, W).

    Returns (blocked before the full-row rule, blocked after it), both (B, Q, h·w) with True = blocked.
    """
    resized = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)
    raw = (resized.sigmoid() < 0.5).flatten(2)
    full_rows = raw.all(dim=-1, keepdim=True)
    return raw, raw & ~full_rows


def direct_masked_softmax(q: Tensor, k: Tensor, v: Tensor, blocked: Tensor) -> Tensor:
    """exp-normalised attention per head. q: (B, H, Q, d); k, v: (B, H, L, d); blocked: (B, Q, L)."""
    logits = torch.einsum("bhqd,bhld->bhql", q, k) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(blocked[:, None], float("-inf"))
    weights = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return torch.einsum("bhql,bhld->bhqd", weights, v)


def split_heads(x: Tensor, heads: int) -> Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).permute(0, 2, 1, 3)


def direct_masked_cross_attention(attn: MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
                                  blocked: Tensor, heads: int) -> Tensor:
    """The decoder's cross-attention with its q/k/v/out projections written out. query: (B, Q, d); key, value:
    (B, L, d); blocked: (B, Q, L)."""
    q = split_heads(query @ attn.q_proj.weight.T + attn.q_proj.bias, heads)
    k = split_heads(key @ attn.k_proj.weight.T + attn.k_proj.bias, heads)
    v = split_heads(value @ attn.v_proj.weight.T + attn.v_proj.bias, heads)
    out = direct_masked_softmax(q, k, v, blocked)
    b, h, n, dh = out.shape
    return out.permute(0, 2, 1, 3).reshape(b, n, h * dh) @ attn.out_proj.weight.T + attn.out_proj.bias


def capture_cross_attention(decoder: MaskedAttentionDecoder) -> tuple[list[tuple[tuple[Tensor, ...], Tensor]], list]:
    calls: list[tuple[tuple[Tensor, ...], Tensor]] = []
    handles = [layer.cross_attn.register_forward_hook(lambda _m, args, out: calls.append((args, out)))
               for layer in decoder.layers]
    return calls, handles


# ------------------------------------------------------------------------------------------------------------
# The mask rule of the masked-attention entry point
# ------------------------------------------------------------------------------------------------------------


def hand_built_mask_case() -> tuple[Tensor, Tensor]:
    """Mask embeddings (1, 4, 4) and full-resolution mask features (1, 4, 8, 8) whose 4×4 mask has one row of
    each kind: 0 partly blocked (right half), 1 fully blocked, 2 fully open, 3 a single open key (row 1, col 2).

    Channel 0 is constant, channel 1 is +1 on the left half and −1 on the right, channel 2 is a 2×2 spike that
    8→4 bilinear downsampling (taps at source columns 2j, 2j+1) maps onto a single memory position.
    """
    feats = torch.zeros(1, 4, 8, 8)
    feats[0, 0] = 1.0
    feats[0, 1, :, :4], feats[0, 1, :, 4:] = 1.0, -1.0
    feats[0, 2, 2:4, 4:6] = 1.0
    feats[0, 3] = torch.randn(8, 8, generator=torch.Generator().manual_seed(3))  # ignored by every embedding
    embed = torch.tensor([[[0.0, 1.0, 0.0, 0.0],
                           [-1.0, 0.0, 0.0, 0.0],
                           [1.0, 0.0, 0.0, 0.0],
                           [-1.0, 0.0, 2.0, 0.0]]])
    return embed, feats


def test_hand_built_mask_has_one_row_of_each_kind() -> None:
    embed, feats = hand_built_mask_case()
    raw, blocked = mask2former_blocked(torch.einsum("bqc,bchw->bqhw", embed, feats), (4, 4))
    assert raw[0].sum(dim=-1).tolist() == [8, 16, 0, 15]
    assert blocked[0].sum(dim=-1).tolist() == [8, 0, 0, 15]
    assert not blocked[0, 3, 1 * 4 + 2]


def test_masked_attention_follows_the_mask2former_rule() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g) for n in (4, 16, 16))
    embed, feats = hand_built_mask_case()
    _, blocked = mask2former_blocked(torch.einsum("bqc,bchw->bqhw", embed, feats), (4, 4))
    factors = F.interpolate(feats, size=(4, 4), mode="bilinear", align_corners=False).flatten(2)

    out = masked_attention(q, k, v, embed, factors)

    torch.testing.assert_close(out, direct_masked_softmax(q, k, v, blocked), atol=ATOL, rtol=0)
    # A single open key passes its value through unchanged; a fully blocked row attends everywhere.
    torch.testing.assert_close(out[:, :, 3], v[:, :, 1 * 4 + 2], atol=ATOL, rtol=0)
    unmasked = direct_masked_softmax(q, k, v, torch.zeros_like(blocked))
    torch.testing.assert_close(out[:, :, 1], unmasked[:, :, 1], atol=ATOL, rtol=0)


def test_a_mask_logit_of_exactly_zero_leaves_the_key_open() -> None:
    """Mask2Former blocks where sigmoid(logit) < 0.5: a logit of exactly 0 (sigmoid 0.5) is open. A query whose
    logits are 0 on half the keys and positive on the rest attends to all of them (not to the positive half)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g) for n in (1, 16, 16))
    feats = torch.zeros(1, 3, 16)
    feats[0, 0, 8:] = 1.0  # channel 0: 0 on the first eight keys, 1 on the last eight
    embed = torch.tensor([[[1.0, 0.0, 0.0]]])
    out = masked_attention(q, k, v, embed, feats)
    everywhere = direct_masked_softmax(q, k, v, torch.zeros(1, 1, 16, dtype=torch.bool))
    torch.testing.assert_close(out, everywhere, atol=ATOL, rtol=0)


def test_masked_attention_does_not_differentiate_the_mask() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g, requires_grad=True) for n in (4, 16, 16))
    embed, feats = hand_built_mask_case()
    embed.requires_grad_()
    factors = F.interpolate(feats, size=(4, 4), mode="bilinear", align_corners=False).flatten(2).requires_grad_()
    masked_attention(q, k, v, embed, factors).square().sum().backward()
    assert embed.grad is None and factors.grad is None
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))


# ------------------------------------------------------------------------------------------------------------
# The factorised mask
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(4, 4), (8, 8), (16, 16), (12, 20)])
def test_factorised_mask_equals_resized_logits_mask(size: tuple[int, int], margin: float = 1e-3) -> None:
    g = torch.Generator().manual_seed(1)
    embed = torch.randn(2, 20, 64, generator=g)
    feats = torch.randn(2, 64, *MASK_SIZE, generator=g)
    mask2former = F.interpolate(torch.einsum("bqc,bchw->bqhw", embed, feats), size=size, mode="bilinear",
                                align_corners=False).flatten(2)
    (factor,) = resized_mask_features(feats, [size])
    factorised = torch.einsum("bqc,bcl->bql", embed, factor)

    torch.testing.assert_close(factorised, mask2former, atol=1e-4, rtol=0)
    # The blocked/open decision agrees wherever rounding cannot flip the sign of the logit.
    decided = mask2former.abs() > margin
    assert decided.float().mean() > 0.99
    assert torch.equal((factorised < 0)[decided], (mask2former.sigmoid() < 0.5)[decided])


# ------------------------------------------------------------------------------------------------------------
# The decoder
# ------------------------------------------------------------------------------------------------------------


def test_output_lists_have_one_prediction_before_and_after_each_layer() -> None:
    cfg = head_cfg()
    mask_features, memories, query_pos = inputs(cfg)
    class_logits, mask_logits = MaskedAttentionDecoder(cfg)(mask_features, memories, query_pos)
    assert len(class_logits) == len(mask_logits) == cfg.decoder_layers + 1
    assert all(c.shape == (2, cfg.num_queries, cfg.num_classes + 1) for c in class_logits)
    assert all(m.shape == (2, cfg.num_queries, *MASK_SIZE) for m in mask_logits)


def test_inference_computes_the_last_prediction_only_and_the_same_one() -> None:
    """all_layers=False (what inference asks for) returns the last prediction, equal to the last of all of them,
    without the intermediate full-size mask products (one einsum per prediction instead of one per layer + 1)."""
    cfg = head_cfg(decoder_layers=4)
    decoder = MaskedAttentionDecoder(cfg).eval()
    x = inputs(cfg)
    with torch.no_grad():
        all_cls, all_masks = decoder(*x)
        einsums = []
        real_einsum = torch.einsum
        try:
            torch.einsum = lambda *a, **k: einsums.append(a[0]) or real_einsum(*a, **k)
            last_cls, last_masks = decoder(*x, all_layers=False)
        finally:
            torch.einsum = real_einsum
    assert len(last_cls) == len(last_masks) == 1 and einsums == ["bqc,bchw->bqhw"]
    torch.testing.assert_close(last_cls[0], all_cls[-1], atol=0, rtol=0)
    torch.testing.assert_close(last_masks[0], all_masks[-1], atol=0, rtol=0)


def test_predictions_read_each_layers_query_through_the_decoder_norm() -> None:
    """class = cls_embed(LN(q)), mask = mask_embed(LN(q)) · mask features, for the query before the first layer
    (querys2feat's output) and after each layer; the norm's affine parameters made non-trivial to show it."""
    cfg = head_cfg(decoder_layers=2)
    decoder = MaskedAttentionDecoder(cfg).eval()
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        decoder.decoder_norm.weight.copy_(torch.rand(cfg.dim, generator=g) + 0.5)
        decoder.decoder_norm.bias.copy_(torch.rand(cfg.dim, generator=g) - 0.5)
    queries: list[Tensor] = []
    decoder.querys2feat.register_forward_hook(lambda m, a, out: queries.append(out))
    for layer in decoder.layers:
        layer.register_forward_hook(lambda m, a, out: queries.append(out[0] if isinstance(out, tuple) else out))
    mask_features, memories, query_pos = inputs(cfg)
    with torch.no_grad():
        class_logits, mask_logits = decoder(mask_features, memories, query_pos)
        assert len(queries) == len(class_logits) == 3
        for q, cls, masks in zip(queries, class_logits, mask_logits):
            x = F.layer_norm(q, (cfg.dim,), decoder.decoder_norm.weight, decoder.decoder_norm.bias)
            torch.testing.assert_close(cls, decoder.cls_embed(x), atol=1e-5, rtol=1e-5)
            expected = torch.einsum("bqc,bchw->bqhw", decoder.mask_embed(x), mask_features)
            torch.testing.assert_close(masks, expected, atol=1e-4, rtol=1e-4)


def test_layers_cycle_through_the_memory_levels_from_coarse_to_fine() -> None:
    cfg = head_cfg(decoder_layers=4)
    decoder = MaskedAttentionDecoder(cfg)
    calls, handles = capture_cross_attention(decoder)
    decoder(*inputs(cfg))
    for h in handles:
        h.remove()
    key_lengths = [args[1].shape[1] for args, _ in calls]
    assert key_lengths == [16, 64, 256, 16]
    assert [args[4].shape[-1] for args, _ in calls] == key_lengths  # mask factors at the same level


def test_cross_attention_inputs_are_queries_and_memory_with_their_embeddings() -> None:
    cfg = head_cfg()
    decoder = MaskedAttentionDecoder(cfg)
    calls, handles = capture_cross_attention(decoder)
    mask_features, memories, query_pos = inputs(cfg)
    with torch.no_grad():
        decoder(mask_features, memories, query_pos)
        content = query_pos @ decoder.querys2feat.weight.T + decoder.querys2feat.bias
    for h in handles:
        h.remove()
    (query, key, value, _, _), _ = calls[0]
    memory = memories[0].flatten(2).transpose(1, 2) + decoder.level_embed.weight[0].detach()
    pos = sine_position_encoding(2, 4, 4, cfg.dim // 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(query, content + query_pos, atol=ATOL, rtol=0)
    torch.testing.assert_close(key, memory + pos, atol=ATOL, rtol=0)
    torch.testing.assert_close(value, memory, atol=ATOL, rtol=0)


def test_layer_is_post_norm_masked_cross_attention_then_self_attention_then_ffn() -> None:
    cfg = head_cfg()
    torch.manual_seed(0)
    layer = MaskedAttentionDecoder(cfg).layers[0]
    g = torch.Generator().manual_seed(2)
    d, nq, length = cfg.dim, cfg.num_queries, 16
    query, query_pos = torch.randn(2, nq, d, generator=g), torch.randn(2, nq, d, generator=g)
    memory, memory_pos = torch.randn(2, length, d, generator=g), torch.randn(1, length, d, generator=g)
    embed, factors = torch.randn(2, nq, d, generator=g), torch.randn(2, d, length, generator=g)
    with torch.no_grad():
        out = layer(query, query_pos, memory, memory_pos, embed, factors)

        raw = (embed @ factors).sigmoid() < 0.5
        blocked = raw & ~raw.all(dim=-1, keepdim=True)
        x = query + direct_masked_cross_attention(layer.cross_attn, query + query_pos, memory + memory_pos,
                                                  memory, blocked, cfg.num_heads)
        x = F.layer_norm(x, (d,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
        no_mask = torch.zeros(2, nq, nq, dtype=torch.bool)
        x = x + direct_masked_cross_attention(layer.self_attn, x + query_pos, x + query_pos, x, no_mask,
                                              cfg.num_heads)
        x = F.layer_norm(x, (d,), layer.norm2.weight, layer.norm2.bias, layer.norm2.eps)
        ffn = layer.ffn
        x = x + torch.relu(x @ ffn.fc1.weight.T + ffn.fc1.bias) @ ffn.fc2.weight.T + ffn.fc2.bias
        expected = F.layer_norm(x, (d,), layer.norm3.weight, layer.norm3.bias, layer.norm3.eps)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)


def crafted_mask_features(decoder: MaskedAttentionDecoder, query_pos: Tensor) -> Tensor:
    """(B, d, 32, 32) features u + s(x)·w whose initial-prediction mask at 4×4 has rows of every kind.

    s is 1 on the 2×2 block that 32→4 bilinear downsampling (taps at source rows/columns 8j+3, 8j+4) maps onto
    memory position (0, 0), 0 elsewhere. A query with embedding e has logit e·u everywhere except e·u + e·w at
    that position; u and w are solved per image so that e·u = ±1 and e·w = ±2 cycle through the four sign
    pairs over the queries: fully blocked (−,−), single open key (−,+), fully open (+,+), all but one (+,−).
    """
    with torch.no_grad():
        embed = decoder.mask_embed(decoder.decoder_norm(decoder.querys2feat(query_pos)))  # (B, Q, d)
    b, nq, _ = embed.shape
    signs = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, 1.0], [1.0, -1.0]]).repeat(nq // 4 + 1, 1)[:nq]
    targets = (signs * torch.tensor([1.0, 2.0])).expand(b, nq, 2)
    uw = torch.linalg.lstsq(embed, targets).solution  # (B, d, 2), exact: Q < d and the embeddings are generic
    spike = torch.zeros(*MASK_SIZE)
    spike[3:5, 3:5] = 1.0
    return uw[..., 0, None, None] + uw[..., 1, None, None] * spike


def test_decoder_cross_attention_uses_the_mask2former_mask_of_the_previous_prediction() -> None:
    cfg = head_cfg()
    torch.manual_seed(0)
    decoder = MaskedAttentionDecoder(cfg)
    calls, handles = capture_cross_attention(decoder)
    _, memories, query_pos = inputs(cfg)
    mask_features = crafted_mask_features(decoder, query_pos)
    with torch.no_grad():
        _, mask_logits = decoder(mask_features, memories, query_pos)
    for h in handles:
        h.remove()

    raw, _ = mask2former_blocked(mask_logits[0], MEMORY_SIZES[0])
    open_keys = (~raw).sum(dim=-1).flatten()
    num_keys = raw.shape[-1]
    assert {0, 1, num_keys - 1, num_keys} <= set(open_keys.tolist()), "the crafted mask misses a kind of row"

    # Layer i attends to level i mod 3 through the mask of prediction i (the one made just before it).
    for i, ((query, key, value, _, _), out) in enumerate(calls):
        _, blocked = mask2former_blocked(mask_logits[i], MEMORY_SIZES[i % 3])
        with torch.no_grad():
            expected = direct_masked_cross_attention(decoder.layers[i].cross_attn, query, key, value, blocked,
                                                     cfg.num_heads)
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=0, msg=lambda m: f"layer {i}: {m}")


def test_attention_mask_is_detached_from_the_mask_prediction() -> None:
    cfg = head_cfg()
    decoder = MaskedAttentionDecoder(cfg)
    mask_features, memories, query_pos = inputs(cfg)
    mask_features.requires_grad_()
    class_logits, mask_logits = decoder(mask_features, memories, query_pos)

    # Class logits depend on the masks only through the attention mask, so no gradient may reach them.
    torch.stack(class_logits).square().sum().backward(retain_graph=True)
    assert mask_features.grad is None
    assert all(p.grad is None for p in decoder.mask_embed.parameters())
    assert decoder.querys2feat.weight.grad is not None

    torch.stack(mask_logits).square().sum().backward()
    assert mask_features.grad is not None and mask_features.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder.mask_embed.parameters())


@pytest.mark.parametrize("which", ["mask_features", "memories", "query_pos"])
def test_bad_input_raises_a_value_error_naming_the_argument(which: str) -> None:
    cfg = head_cfg()
    mask_features, memories, query_pos = inputs(cfg)
    if which == "mask_features":
        mask_features = mask_features[:, :-1]
    elif which == "memories":
        memories = [memories[0], memories[1], memories[2][:1]]
    else:
        query_pos = query_pos[0]
    with pytest.raises(ValueError, match=which):
        MaskedAttentionDecoder(cfg)(mask_features, memories, query_pos)


def test_flex_applies_the_mask_as_the_other_backends_do(monkeypatch):
    # QD_ATTENTION=flex once fell through to SDPA for every masked attention. FlexAttention runs eagerly on the CPU
    # (slowly, with a warning), which is enough to check the mask it is given.
    import qd_core.attention as attention
    from kernels import masked_attention_reference

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    mask_embed, mask_feats = torch.randn(2, 5, 4), torch.randn(2, 4, 7)
    mask_embed[0, 1] = -mask_feats[0].mean(dim=1) * 100  # a query likely to have every key blocked
    monkeypatch.setattr(attention, "backend_for", lambda t: "flex")
    out = attention.masked_attention(q, k, v, mask_embed, mask_feats)
    torch.testing.assert_close(out, masked_attention_reference(q, k, v, mask_embed, mask_feats), atol=1e-5,
                               rtol=1e-5)


def test_an_attention_backend_that_is_not_installed_is_refused_by_name(monkeypatch):
    import importlib.util

    import qd_core.attention as attention

    if importlib.util.find_spec("xformers") is None:
        monkeypatch.setenv("QD_ATTENTION", "xformers")
        with pytest.raises(ValueError, match="QD_ATTENTION=xformers: xformers.ops is not installed here"):
            attention.backend_for(torch.zeros(1))
    monkeypatch.setenv("QD_ATTENTION", "flex")  # installed with torch, but CUDA only
    with pytest.raises(ValueError, match="QD_ATTENTION=flex: this backend needs CUDA tensors"):
        attention.backend_for(torch.zeros(1))
