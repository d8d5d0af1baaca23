"""Typed configs: shipped files, dotted overrides, and errors that name the key."""
import re

import pytest

from qd_core.config import (ConfigError, apply_overrides, config_from_dict, default_merge_stages,
                            default_out_indices, dump_config, load_config)

SHIPPED = ["tiny", "vits16_256", "vitl16_512", "vitl16_1024"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load_and_validate(name):
    cfg = load_config(name)
    assert cfg.name == name
    assert cfg.model.head.num_queries == cfg.model.reins.token_length


def test_paper_default_matches_method():
    m = load_config("vitl16_512").model
    assert (m.backbone.embed_dim, m.backbone.depth, m.backbone.num_heads, m.backbone.patch_size) == (1024, 24, 16, 16)
    assert (m.reins.token_length, m.reins.lora_dim) == (100, 16)
    assert (m.head.dim, m.head.num_heads, m.head.pixel_decoder_layers, m.head.decoder_layers) == (256, 8, 6, 9)
    assert default_out_indices(24) == [7, 11, 15, 23]
    assert default_merge_stages(24) == [12, 6, 3]


def test_1024_inherits_from_512_and_overrides_window():
    cfg = load_config("vitl16_1024")
    assert cfg.model.backbone.embed_dim == 1024
    assert cfg.model.backbone.pos_grid_size == 1024
    assert cfg.inference.window == [1024, 1024] and cfg.inference.stride == [683, 683]


def test_out_indices_scale_with_depth():
    assert default_out_indices(12) == [3, 5, 7, 11]
    assert default_out_indices(4) == [0, 1, 2, 3]


def test_dotted_override_sets_nested_value():
    cfg = load_config("tiny", ["model.backbone.depth=8", "inference.mode=whole", "model.head.refine=false"])
    assert cfg.model.backbone.depth == 8
    assert cfg.inference.mode == "whole"
    assert cfg.model.head.refine is False


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.head.dimm'"):
        load_config("tiny", ["model.head.dimm=3"])


def test_wrong_type_is_named_with_value():
    with pytest.raises(ConfigError, match=r"'model.head.dim' = 'abc': expected an integer"):
        load_config("tiny", ["model.head.dim=abc"])


def test_cross_field_validation_names_key():
    with pytest.raises(ConfigError, match=r"model.head.num_queries"):
        load_config("tiny", ["model.head.num_queries=7"])
    with pytest.raises(ConfigError, match=r"model.backbone.num_heads"):
        load_config("tiny", ["model.backbone.num_heads=3"])
    with pytest.raises(ConfigError, match=r"inference.mode"):
        load_config("tiny", ["inference.mode=tiles"])


@pytest.mark.parametrize("override, key", [
    ("train.poly_power=-1", "train.poly_power"), ("train.warmup_iters=-100", "train.warmup_iters"),
    ("train.min_lr=-0.01", "train.min_lr"), ("train.min_lr=1.0", "train.min_lr"),
    ("train.warmup_ratio=5", "train.warmup_ratio"), ("train.weight_decay=-0.1", "train.weight_decay"),
    ("train.eps=0", "train.eps"), ("train.grad_clip=-1", "train.grad_clip"),
])
def test_schedule_and_optimizer_values_are_range_checked(override, key):
    # Without the checks these ran: a negative poly power ended the schedule at 11,000 × the learning rate.
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config("tiny", [override])


def test_missing_config_names_known_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"shipped: .*tiny"):
        load_config("no_such_config")
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config(tmp_path / "absent.yaml")


def test_bad_yaml_file_is_named(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*not valid YAML") as info:
        load_config(p)
    # One line, with where: PyYAML's own message spans four, with a copy of the line.
    assert "\n" not in str(info.value) and "line 2, column 1" in str(info.value), str(info.value)


def test_a_bad_value_is_blamed_on_where_it_came_from(tmp_path):
    with pytest.raises(ConfigError, match=r"^key=value override: config key 'train.iters' = 'abc'"):
        load_config("tiny", ["train.iters=abc"])
    p = tmp_path / "mine.yaml"
    p.write_text("base: tiny\ntrain: {iters: abc}\n")
    with pytest.raises(ConfigError, match=r"mine.yaml: config key 'train.iters' = 'abc'"):
        load_config(p, ["train.lr=0.1"])
    with pytest.raises(ConfigError, match=r"is a folder: expected a YAML file"):
        load_config(tmp_path)


def test_overrides_leave_the_given_dict_as_it_was():
    stored = {"model": {"head": {"dim": 64}}, "train": {"iters": 5}}
    merged = apply_overrides(stored, ["model.head.dim=32", "train.iters=9"])
    assert merged == {"model": {"head": {"dim": 32}}, "train": {"iters": 9}}
    assert stored == {"model": {"head": {"dim": 64}}, "train": {"iters": 5}}


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["model.head.dim"])


def test_dump_round_trips(tmp_path):
    cfg = load_config("tiny", ["model.head.decoder_layers=2"])
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    again = load_config(p)
    assert again.to_dict() == cfg.to_dict()
    assert config_from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_the_paper_configs_carry_methods_optimisation_and_loss_settings() -> None:
    """METHOD §6.3 and §7, most of them from TrainConfig's defaults (which the paper configs rely on)."""
    tr = load_config("vitl16_512").train
    assert (tr.lr, tr.weight_decay, list(tr.betas), tr.eps) == (1e-4, 0.05, [0.9, 0.999], 1e-8)
    assert (tr.poly_power, tr.min_lr, tr.warmup_iters, tr.iters, tr.batch_size) == (0.9, 0.0, 0, 40000, 4)
    assert (tr.class_weight, tr.mask_weight, tr.dice_weight, tr.no_object_weight) == (2.0, 5.0, 5.0, 0.1)
    assert (tr.num_points, tr.oversample_ratio, tr.importance_sample_ratio) == (12544, 3.0, 0.75)
    big = load_config("vitl16_1024").train
    assert (big.lr, big.warmup_iters, big.warmup_ratio, big.batch_size) == (6e-5, 10000, 1e-6, 2)


def test_the_trainers_criterion_is_built_from_the_config() -> None:
    from train.trainer import build_criterion

    crit = build_criterion(load_config("vitl16_512"))
    assert crit.class_weights.tolist() == pytest.approx([1.0] * 19 + [0.1])
    assert (crit.class_weight, crit.mask_weight, crit.dice_weight) == (2.0, 5.0, 5.0)
    assert (crit.num_points, crit.oversample_ratio, crit.importance_sample_ratio) == (12544, 3.0, 0.75)
    m = crit.matcher
    assert (m.cost_class, m.cost_mask, m.cost_dice, m.num_points) == (2.0, 5.0, 5.0, 12544)
    tiny = build_criterion(load_config("tiny"))  # its own loss weights, which the matcher shares
    assert (tiny.class_weight, tiny.matcher.cost_class) == (5.0, 5.0)
    assert (tiny.mask_weight, tiny.matcher.cost_mask) == (2.0, 2.0)
