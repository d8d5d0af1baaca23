"""Agent-query encoder (METHOD §3.3): image-dependent layer queries, per-slot progressive merging."""
import torch

from qd_core.agent_queries import AgentQueryEncoder, StageMerger


def encoder(image_dependent=True, own_tokens=False, layers=8, stages=(4, 2, 1)):
    torch.manual_seed(0)
    return AgentQueryEncoder(layers, 32, 5, num_heads=2, merge_stages=list(stages), merge_dim=16, merge_heads=2,
                             mlp_ratio=2.0, image_dependent=image_dependent, own_tokens=own_tokens)


def test_output_is_one_query_per_token_slot():
    enc = encoder()
    feats = [torch.randn(3, 12, 32) for _ in range(8)]
    q = enc(feats, torch.randn(8, 5, 32))
    assert q.shape == (3, 5, 32)


def test_image_dependent_queries_differ_between_images():
    enc = encoder()
    tokens = torch.randn(8, 5, 32)
    feats = [torch.randn(2, 12, 32) for _ in range(8)]
    q = enc(feats, tokens)
    assert not torch.allclose(q[0], q[1])


def test_layer_queries_are_each_layers_tokens_plus_their_cross_attention_to_its_features():
    """METHOD §3.3 per layer l and image b: T_l + Attn(LN(T_l), LN(F_l,b), LN(F_l,b)), written out one pair at a
    time; the encoder runs all pairs as one batch. fp32: the same products in another batching, ~1e-6."""
    enc = encoder().eval()
    tokens = torch.randn(8, 5, 32)
    feats = [torch.randn(3, 12, 32) for _ in range(8)]
    with torch.no_grad():
        got = enc.layer_queries(tokens, feats)  # (B, L, m, D)
        for layer in range(8):
            for image in range(3):
                t = tokens[layer][None]
                f = enc.norm_feat(feats[layer][image][None])
                expected = t + enc.aggregate(enc.norm_query(t), f, f)
                torch.testing.assert_close(got[image, layer], expected[0], atol=1e-5, rtol=0)


def test_image_independent_variant_ignores_features():
    enc = encoder(image_dependent=False)
    tokens = torch.randn(8, 5, 32)
    q1 = enc([torch.randn(2, 12, 32) for _ in range(8)], tokens)
    q2 = enc([torch.randn(2, 12, 32) for _ in range(8)], tokens)
    torch.testing.assert_close(q1, q2)
    torch.testing.assert_close(q1[0], q1[1])


def test_merging_stages_shrink_layer_groups():
    merger = StageMerger(3, 32, 16, 2)
    assert merger(torch.randn(10, 7, 32)).shape == (10, 3, 32)


def test_slots_are_merged_independently():
    enc = encoder(image_dependent=False)
    tokens = torch.randn(8, 5, 32)
    feats = [torch.randn(1, 12, 32) for _ in range(8)]
    base = enc(feats, tokens)
    tokens2 = tokens.clone()
    tokens2[:, 3] += 1.0  # change slot 3 in every layer
    changed = enc(feats, tokens2)
    same = [j for j in range(5) if j != 3]
    torch.testing.assert_close(changed[:, same], base[:, same])
    assert not torch.allclose(changed[:, 3], base[:, 3])


def test_gradients_reach_tokens_and_merger():
    enc = encoder()
    tokens = torch.randn(8, 5, 32, requires_grad=True)
    enc([torch.randn(2, 12, 32) for _ in range(8)], tokens).sum().backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    assert enc.mergers[0].group_tokens.grad is not None


def test_own_tokens_when_no_reins():
    enc = encoder(own_tokens=True)
    assert enc([torch.randn(1, 12, 32) for _ in range(8)]).shape == (1, 5, 32)


def _attention(attn, query, key, value, heads):
    """Multi-head attention written out from the module's four projections: (S, Lq, D) × (S, Lk, D) → (S, Lq, D)."""
    q, k, v = attn.q_proj(query), attn.k_proj(key), attn.v_proj(value)
    s, lq, d = q.shape
    dh = d // heads

    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, dh).transpose(1, 2)

    weights = (split(q) @ split(k).transpose(-1, -2) / dh ** 0.5).softmax(-1)
    return attn.out_proj((weights @ split(v)).transpose(1, 2).reshape(s, lq, d))


def test_merging_runs_the_stages_in_order_then_averages_the_last_groups():
    """METHOD §3.3 written out: per slot, the L layer versions go through each stage in config order (groups
    attend to proj_in of the previous stage's outputs, then LayerNorm and proj_out), then the mean of the last
    stage's groups, LayerNorm and the MLP. Stages 6 → 3 → 2: the order and the final mean (not a max) both show."""
    enc = encoder(stages=(6, 3, 2)).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for merger in enc.mergers:  # non-trivial norms, so a skipped or misplaced LayerNorm shows
            merger.norm.weight.copy_(torch.rand(merger.norm.weight.shape, generator=g) + 0.5)
            merger.norm.bias.copy_(torch.rand(merger.norm.bias.shape, generator=g) - 0.5)
            # At init each stage's groups attend almost uniformly and come out nearly equal (their spread falls
            # ~400-fold per stage), which would hide the order and mean-versus-max: sharper attention keeps them apart.
            merger.attn.q_proj.weight.mul_(8.0)
            merger.proj_out.weight.mul_(8.0)
    assert [m.group_tokens.shape[0] for m in enc.mergers] == [6, 3, 2]
    tokens = torch.randn(8, 5, 32, generator=g)
    feats = [torch.randn(2, 12, 32, generator=g) for _ in range(8)]
    with torch.no_grad():
        got = enc(feats, tokens)
        x = enc.layer_queries(tokens, feats).permute(0, 2, 1, 3).reshape(2 * 5, 8, 32)  # (B·m, L, D)
        for merger in enc.mergers:
            h = merger.proj_in(x)
            groups = merger.group_tokens[None].expand(x.shape[0], -1, -1)
            x = merger.proj_out(merger.norm(_attention(merger.attn, groups, h, h, heads=2)))
        expected = enc.final_mlp(enc.final_norm(x.mean(dim=1))).view(2, 5, 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
