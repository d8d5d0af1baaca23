"""Specification of the refinement module (METHOD §5).

All tensors are fp32 with O(1) values and reductions over at most 4·d = 256 terms, so independent computations of
the same quantity agree to ~1e-6; the tolerances below (1e-5) leave an order of magnitude of margin.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from qd_core.config import HeadConfig, load_config
from qd_core.head.refine import Refinement
from qd_core.layers import MultiheadAttention

ATOL = 1e-5
MEMORY_SIZES = [(2, 2), (4, 4), (8, 8)]  # strides 32, 16, 8 of a 64×64 image
MASK_SIZE = (16, 16)  # stride 4


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
    queries = torch.randn(batch, cfg.num_queries, d, generator=g)
    return mask_features, memories, queries


def eval_module(cfg: HeadConfig, seed: int = 1) -> Refinement:
    """A module in eval mode whose BatchNorms have non-trivial running statistics and affine parameters."""
    torch.manual_seed(seed)
    module = Refinement(cfg).eval()
    for fusion in module.fusions:
        bn = fusion.norm
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    return module


def capture_attention_outputs(module: Refinement) -> tuple[list[Tensor], torch.utils.hooks.RemovableHandle]:
    """The cross-attention's output per map, [M0, M1, M2, M3], cut from its one call over all four maps' tokens
    (an output of another length, e.g. from a call per map, is kept whole and fails the token-count check)."""
    outputs: list[Tensor] = []
    counts = [math.prod(MASK_SIZE)] + [h * w for h, w in MEMORY_SIZES]

    def keep(_m, _args, out: Tensor) -> None:
        outputs.extend(out.detach().split(counts, dim=1) if out.shape[1] == sum(counts) else [out.detach()])
    handle = module.cross_attn.register_forward_hook(keep)
    return outputs, handle


def direct_multihead_attention(attn: MultiheadAttention, x: Tensor, kv: Tensor, heads: int) -> Tensor:
    """softmax(q kᵀ/√d_h) v per head with the q/k/v/out projections written out. x: (B, N, d); kv: (B, M, d)."""
    b, n, d = x.shape
    dh = d // heads
    q = x @ attn.q_proj.weight.T + attn.q_proj.bias
    k = kv @ attn.k_proj.weight.T + attn.k_proj.bias
    v = kv @ attn.v_proj.weight.T + attn.v_proj.bias
    q, k, v = (t.reshape(b, -1, heads, dh).permute(0, 2, 1, 3) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)
    out = (weights @ v).permute(0, 2, 1, 3).reshape(b, n, d)
    return out @ attn.out_proj.weight.T + attn.out_proj.bias


def direct_fusion(module: Refinement, maps: list[Tensor]) -> list[Tensor]:
    """G_j = ReLU(BN_eval(PW(DW_dil=j(U)))) with U = concat of the maps resized to stride 4; outputs resized."""
    u = torch.cat([F.interpolate(m, size=MASK_SIZE, mode="bilinear", align_corners=False) for m in maps], dim=1)
    outs = []
    for j, fusion in enumerate(module.fusions, start=1):
        y = F.conv2d(u, fusion.depthwise.weight, padding=j, dilation=j, groups=u.shape[1])
        y = F.conv2d(y, fusion.pointwise.weight)
        bn = fusion.norm
        y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
        y = y * bn.weight[:, None, None] + bn.bias[:, None, None]
        outs.append(torch.relu(y))
    sizes = [MASK_SIZE, *MEMORY_SIZES]
    return [F.interpolate(g, size=s, mode="bilinear", align_corners=False) for g, s in zip(outs, sizes)]


def test_output_shapes_match_inputs() -> None:
    cfg = head_cfg()
    mask_features, memories, queries = inputs(cfg)
    new_mask_features, new_memories = Refinement(cfg)(mask_features, memories, queries)
    assert new_mask_features.shape == mask_features.shape
    assert [m.shape for m in new_memories] == [m.shape for m in memories]


def test_one_attention_module_is_shared_by_all_four_maps() -> None:
    cfg = head_cfg()
    module = Refinement(cfg)
    assert sum(isinstance(m, MultiheadAttention) for m in module.modules()) == 1
    calls: list[int] = []
    counter = module.cross_attn.register_forward_hook(lambda *_: calls.append(1))
    outputs, handle = capture_attention_outputs(module)
    module(*inputs(cfg))
    handle.remove()
    counter.remove()
    assert len(calls) == 1  # the four maps' tokens go through as one sequence
    token_counts = [math.prod(MASK_SIZE)] + [h * w for h, w in MEMORY_SIZES]
    assert [o.shape[1] for o in outputs] == token_counts


def test_cross_attention_equals_direct_math_on_one_level() -> None:
    cfg = head_cfg()
    module = eval_module(cfg)
    mask_features, memories, queries = inputs(cfg)
    outputs, handle = capture_attention_outputs(module)
    with torch.no_grad():
        module(mask_features, memories, queries)
    handle.remove()
    level = memories[1]  # stride 16
    keys = queries @ module.query_proj.weight.T + module.query_proj.bias
    with torch.no_grad():
        expected = direct_multihead_attention(module.cross_attn, level.flatten(2).transpose(1, 2), keys,
                                              cfg.num_heads)
    torch.testing.assert_close(outputs[2], expected, atol=ATOL, rtol=0)


def test_fusion_blocks_are_depthwise_separable_with_dilations_one_to_four() -> None:
    cfg = head_cfg()
    module = Refinement(cfg)
    assert len(module.fusions) == 4
    for j, fusion in enumerate(module.fusions, start=1):
        dw, pw = fusion.depthwise, fusion.pointwise
        assert dw.dilation == (j, j) and dw.padding == (j, j) and dw.kernel_size == (3, 3)
        assert dw.groups == dw.in_channels == 4 * cfg.dim
        assert pw.kernel_size == (1, 1) and (pw.in_channels, pw.out_channels) == (4 * cfg.dim, cfg.dim)
        assert dw.bias is None and pw.bias is None


def test_outputs_fuse_attention_outputs_that_replace_the_maps() -> None:
    cfg = head_cfg(refine_residual=False)
    module = eval_module(cfg)
    outputs, handle = capture_attention_outputs(module)
    mask_features, memories, queries = inputs(cfg)
    with torch.no_grad():
        got_mask, got_memories = module(mask_features, memories, queries)
    handle.remove()
    maps = [o.transpose(1, 2).reshape_as(m) for o, m in zip(outputs, [mask_features, *memories])]
    expected = direct_fusion(module, maps)
    for got, want in zip([got_mask, *got_memories], expected):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_residual_flag_adds_the_maps_back_before_fusion() -> None:
    cfg = head_cfg(refine_residual=True)
    module = eval_module(cfg)
    outputs, handle = capture_attention_outputs(module)
    mask_features, memories, queries = inputs(cfg)
    originals = [mask_features, *memories]
    with torch.no_grad():
        got_mask, got_memories = module(mask_features, memories, queries)
    handle.remove()
    maps = [m + o.transpose(1, 2).reshape_as(m) for o, m in zip(outputs, originals)]
    expected = direct_fusion(module, maps)
    for got, want in zip([got_mask, *got_memories], expected):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    without = eval_module(head_cfg(refine_residual=False))
    with torch.no_grad():
        plain_mask, _ = without(mask_features, memories, queries)
    assert not torch.allclose(plain_mask, got_mask, atol=1e-3)


def test_gradients_reach_every_parameter() -> None:
    cfg = head_cfg()
    module = Refinement(cfg)
    mask_features, memories, queries = inputs(cfg)
    new_mask, new_memories = module(mask_features, memories, queries.requires_grad_())
    (new_mask.square().mean() + sum(m.square().mean() for m in new_memories)).backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert queries.grad is not None and queries.grad.abs().sum() > 0


@pytest.mark.parametrize("which", ["mask_features", "memories", "queries"])
def test_bad_input_raises_a_value_error_naming_the_argument(which: str) -> None:
    cfg = head_cfg()
    mask_features, memories, queries = inputs(cfg)
    if which == "mask_features":
        mask_features = mask_features[:, :-1]
    elif which == "memories":
        memories = memories[:2]
    else:
        queries = queries[..., :-1]
    with pytest.raises(ValueError, match=which):
        Refinement(cfg)(mask_features, memories, queries)
