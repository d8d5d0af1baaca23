"""LoRAReins (METHOD §2.3): the update equals the paper's equations, token 0 is a value-free sink, gradients reach
every Rein parameter, and the module plugs into the backbone as its adapter."""
from __future__ import annotations

import math
import re

import pytest
import torch
from torch import Tensor, nn

import qd_core.reins as reins_module
from kernels import agent_attention_reference
from qd_core.backbone import DinoVisionTransformer
from qd_core.config import BackboneConfig, ReinsConfig
from qd_core.reins import LoRAReins, token_init_bound

LAYERS, DIM, TOKENS, RANK = 3, 32, 6, 4
# fp32 with D = 32: the reference and the module differ only in summation order (~1e-7 on values of size ~1).
ATOL = 1e-5


def make_reins(scale: float = 0.7) -> LoRAReins:
    # A large scale makes the Rein update a visible part of the output (the paper's 1e-3 would hide it).
    torch.manual_seed(0)
    return LoRAReins(LAYERS, DIM, ReinsConfig(token_length=TOKENS, lora_dim=RANK, scale_init=scale))


def tokens_in(batch: int = 2, patches: int = 10) -> Tensor:
    return torch.randn(batch, 1 + patches, DIM, generator=torch.Generator().manual_seed(1))


def method_reference(reins: LoRAReins, x: Tensor, layer: int) -> Tensor:
    """METHOD §2.3 written out with einsums."""
    t = reins.learnable_tokens_a[layer] @ reins.learnable_tokens_b[layer]  # (m, D)
    cls, p = x[:, :1], x[:, 1:]
    att = torch.softmax(torch.einsum("bnc,mc->bnm", p, t) / math.sqrt(DIM), dim=-1)
    delta = torch.einsum("bnm,mc->bnc", att[:, :, 1:], reins.mlp_token2feat(t[1:]))
    delta = reins.mlp_delta_f(delta + p)
    return torch.cat([cls, p + reins.scale * delta], dim=1)


class BumpRow(nn.Module):
    """Wraps mlp_token2feat and adds a large vector to one row of its (m, D) output."""

    def __init__(self, inner: nn.Module, row: int) -> None:
        super().__init__()
        self.inner, self.row = inner, row

    def forward(self, t: Tensor) -> Tensor:
        out = self.inner(t)
        bump = torch.zeros_like(out)
        bump[self.row] = 50.0
        return out + bump


class BumpRow3d(BumpRow):
    """BumpRow for the (L, m, D) values ``bind`` computes: the row of every block."""

    def forward(self, t: Tensor) -> Tensor:
        out = self.inner(t)
        bump = torch.zeros_like(out)
        bump[..., self.row, :] = 50.0
        return out + bump


@pytest.mark.parametrize("layer", [0, LAYERS - 1])
def test_update_equals_the_method_equations(layer):
    reins, x = make_reins(), tokens_in()
    with torch.no_grad():
        torch.testing.assert_close(reins(x, layer), method_reference(reins, x, layer), atol=ATOL, rtol=0)


@pytest.mark.parametrize("layer", [0, 1, LAYERS - 1])
def test_the_bound_adapter_the_model_runs_equals_the_method_equations(layer):
    """``bind`` (what QueryDiffStudent.forward uses) computes every block's tokens and values at once: each block
    must still get its own."""
    reins, x = make_reins(), tokens_in()
    with torch.no_grad():
        adapter = reins.bind(reins.all_tokens())
        torch.testing.assert_close(adapter(x, layer), method_reference(reins, x, layer), atol=ATOL, rtol=0)


def test_the_bound_adapter_keeps_token_zero_value_free():
    reins, x = make_reins(), tokens_in()
    with torch.no_grad():
        before = reins.bind(reins.all_tokens())(x, 1)
        reins.mlp_token2feat = BumpRow3d(reins.mlp_token2feat, row=0)
        assert torch.equal(reins.bind(reins.all_tokens())(x, 1), before)
        reins.mlp_token2feat = BumpRow3d(reins.mlp_token2feat.inner, row=1)
        assert not torch.allclose(reins.bind(reins.all_tokens())(x, 1), before, atol=1e-3)


def test_cls_token_passes_through_unchanged():
    reins, x = make_reins(), tokens_in()
    with torch.no_grad():
        assert torch.equal(reins(x, 1)[:, 0], x[:, 0])


def test_token_zero_carries_no_value():
    reins, x = make_reins(), tokens_in()
    with torch.no_grad():
        before = reins(x, 1)
        reins.mlp_token2feat = BumpRow(reins.mlp_token2feat, row=0)
        assert torch.equal(reins(x, 1), before)
        reins.mlp_token2feat = BumpRow(reins.mlp_token2feat.inner, row=1)
        assert not torch.allclose(reins(x, 1), before, atol=1e-3)


def test_token_zero_takes_part_in_the_softmax():
    reins, x = make_reins(), tokens_in()
    with torch.no_grad():
        before = reins(x, 1)
        reins.learnable_tokens_a[1, 0] += 1.0  # moves only token 0 of layer 1
        assert not torch.allclose(reins(x, 1), before, atol=1e-4)


def test_attention_goes_through_the_agent_attention_entry_point(monkeypatch):
    reins, x = make_reins(), tokens_in(batch=2, patches=10)
    shapes = []

    def spy(q, k, v, *, scale=None):
        shapes.append((tuple(q.shape), tuple(k.shape), tuple(v.shape), scale))
        return agent_attention_reference(q, k, v, scale=scale)

    monkeypatch.setattr(reins_module, "agent_attention", spy)
    with torch.no_grad():
        reins(x, 0)
    # One head of width D; keys and values shared over the batch (leading dim 1).
    assert shapes == [((2, 1, 10, DIM), (1, 1, TOKENS, DIM), (1, 1, TOKENS, DIM), DIM ** -0.5)]


def test_tokens_are_the_per_layer_low_rank_products():
    reins = make_reins()
    with torch.no_grad():
        everything = reins.all_tokens()
        assert everything.shape == (LAYERS, TOKENS, DIM)
        for layer in range(LAYERS):
            expected = reins.learnable_tokens_a[layer] @ reins.learnable_tokens_b[layer]
            torch.testing.assert_close(reins.tokens(layer), expected, atol=0, rtol=0)
            torch.testing.assert_close(everything[layer], expected, atol=1e-6, rtol=0)


def test_gradients_reach_every_rein_parameter():
    reins, x = make_reins(scale=1e-3), tokens_in()
    reins(x, 1)[:, 1:].square().sum().backward()
    for name, p in reins.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Only layer 1's token factors were used.
    for factor in (reins.learnable_tokens_a, reins.learnable_tokens_b):
        assert factor.grad[1].abs().sum() > 0
        assert factor.grad[0].abs().sum() == 0 and factor.grad[2].abs().sum() == 0


@pytest.mark.parametrize("path", ["forward", "bind"])
def test_gradients_of_every_rein_parameter_equal_the_method_equations(path):
    # Equal outputs do not mean equal training: values computed from detached tokens keep the forward pass but
    # drop the tokens' gradient through the values.
    reins, x = make_reins(), tokens_in()
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    names, params = zip(*reins.named_parameters())
    out = reins(x, 1) if path == "forward" else reins.bind(reins.all_tokens())(x, 1)
    got = torch.autograd.grad((out * weight).sum(), params, allow_unused=True)
    expected = torch.autograd.grad((method_reference(reins, x, 1) * weight).sum(), params)
    for name, g, e in zip(names, got, expected):
        assert g is not None, name
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_parameters_are_named_and_shaped_as_in_rein():
    reins = LoRAReins(24, 1024, ReinsConfig(token_length=100, lora_dim=16, scale_init=1e-3))
    shapes = {name: tuple(p.shape) for name, p in reins.named_parameters()}
    assert shapes == {
        "learnable_tokens_a": (24, 100, 16), "learnable_tokens_b": (24, 16, 1024), "scale": (),
        "mlp_token2feat.weight": (1024, 1024), "mlp_token2feat.bias": (1024,),
        "mlp_delta_f.weight": (1024, 1024), "mlp_delta_f.bias": (1024,),
    }
    assert reins.scale.item() == pytest.approx(1e-3)
    # 2.53 M trainable parameters; METHOD §9 note d's ~2.99 M also counts Rein's `transform` and `merge` layers,
    # which are not part of LoRAReins here (W_h is the student's query_link).
    assert sum(p.numel() for p in reins.parameters()) == 2 * 1024 * 1025 + 24 * (100 * 16 + 16 * 1024) + 1


def test_token_init_is_uniform_within_reins_bound():
    # sqrt(6 / (3 * 16^2 + sqrt(1024 * 16))) = sqrt(6 / 896) for the paper's D = 1024, r = 16, patch 16.
    assert token_init_bound(1024, 16, 16) == pytest.approx(math.sqrt(6 / 896))
    assert token_init_bound(1024, 16, 16) == pytest.approx(0.0818, abs=1e-4)
    # The 16 is the patch size, not the rank: the tiny config (D = 64, r = 8) keeps 3 * 16^2.
    assert token_init_bound(64, 8, 16) == pytest.approx(math.sqrt(6 / (3 * 16 ** 2 + math.sqrt(64 * 8))))
    torch.manual_seed(0)
    reins = LoRAReins(4, 64, ReinsConfig(token_length=50, lora_dim=8))
    bound = token_init_bound(64, 8, 16)
    for factor in (reins.learnable_tokens_a, reins.learnable_tokens_b):
        values = factor.detach().flatten()  # U(-v, v): 1600+ samples, mean 0 and std v / sqrt(3)
        assert values.abs().max() <= bound and values.min() < -0.9 * bound and values.max() > 0.9 * bound
        assert abs(values.mean().item()) < 0.1 * bound
        assert values.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)


def test_rein_linear_layers_keep_pytorchs_default_init():
    # Neither projection is zero-initialised: both are U(-1/sqrt(fan_in), 1/sqrt(fan_in)), weights and biases.
    torch.manual_seed(0)
    reins = LoRAReins(2, 64, ReinsConfig(token_length=8, lora_dim=4))
    bound = 1 / math.sqrt(64)
    for layer in (reins.mlp_token2feat, reins.mlp_delta_f):
        w, b = layer.weight.detach(), layer.bias.detach()
        assert w.abs().max() <= bound and b.abs().max() <= bound and b.abs().max() > 0.5 * bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)


def test_rein_defaults_are_the_papers():
    # METHOD §2.3: m = 100 tokens, rank 16, scale initialised to 1e-3; no shipped config sets scale_init, so the
    # paper config trains with the default.
    from qd_core.config import load_config

    assert (ReinsConfig().token_length, ReinsConfig().lora_dim, ReinsConfig().scale_init) == (100, 16, 1e-3)
    model = load_config("vitl16_512").model
    assert (model.reins.token_length, model.reins.lora_dim, model.reins.scale_init) == (100, 16, 1e-3)


def test_zero_scale_leaves_the_backbone_output_unchanged():
    torch.manual_seed(0)
    backbone = DinoVisionTransformer(BackboneConfig(patch_size=16, embed_dim=DIM, depth=LAYERS, num_heads=2,
                                                    pos_grid_size=64))
    reins = LoRAReins(LAYERS, DIM, ReinsConfig(token_length=TOKENS, lora_dim=RANK, scale_init=0.0))
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        plain, adapted = backbone(images), backbone(images, adapter=reins)
    torch.testing.assert_close(adapted.final, plain.final, atol=0, rtol=0)


@pytest.mark.parametrize(("x", "layer", "expected"), [
    (torch.randn(2, 11, DIM + 1), 0, "x: expected (B, 1+N, 32)"),
    (torch.randn(11, DIM), 0, "x: expected (B, 1+N, 32)"),
    (torch.randn(2, 1, DIM), 0, "N >= 1"),
    (torch.randn(2, 11, DIM), LAYERS, "layer = 3: expected a block index in [0, 3)"),
    (torch.randn(2, 11, DIM), -1, "layer = -1"),
])
def test_bad_input_raises_a_value_error(x, layer, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        make_reins()(x, layer)
