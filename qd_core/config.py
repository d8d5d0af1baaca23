"""Typed configuration: dataclasses, YAML files and dotted command-line overrides.

A config is a tree of frozen-free dataclasses. YAML files hold a partial tree: every key they name must exist
in the dataclass (a typo is an error naming the key), and every value is checked against the field's type.
Shipped configs live in ``configs/<name>.yaml`` at the top of the repository (``qd_core/configs/`` in an installed
wheel) and can be named without path.

    cfg = load_config("tiny", overrides=["model.backbone.depth=4"])
"""
from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml


def _config_dir() -> Path:
    """The shipped configs: inside the package when installed from a wheel, else the checkout's configs/."""
    installed = Path(__file__).resolve().parent / "configs"
    return installed if installed.is_dir() else Path(__file__).resolve().parent.parent / "configs"


CONFIG_DIR = _config_dir()


class ConfigError(ValueError):
    """A config file, key or value that is not what the schema expects."""


# --------------------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------------------


@dataclass
class BackboneConfig:
    """DINOv2 ViT (METHOD §2.1). Widths here must match the checkpoint one loads."""

    patch_size: int = 16
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    # Side of the square image the stored position grid was made for (grid = pos_grid_size // patch_size).
    pos_grid_size: int = 512
    # Blocks whose outputs feed the pyramid (0-based). Empty means the paper's 7/11/15/23 scaled to `depth`.
    out_indices: list[int] = field(default_factory=list)
    layerscale_init: float = 1e-5
    layer_norm_eps: float = 1e-6
    # Converted DINOv2 checkpoint (.pth or .safetensors) loaded into the frozen backbone; empty = random init.
    checkpoint: str = ""
    # With no checkpoint: `python -m train` first pretrains this ViT on the synthetic source scenes for
    # `pretrain_steps` steps (made once, beside the synthetic data; `python -m train backbone` does the same by
    # hand) and uses it as the frozen backbone. For the CPU default, which has no DINOv2.
    pretrain: bool = False
    pretrain_steps: int = 400


@dataclass
class ReinsConfig:
    """LoRA-Reins adapter after every backbone block (METHOD §2.3)."""

    enabled: bool = True
    token_length: int = 100
    lora_dim: int = 16
    scale_init: float = 1e-3


@dataclass
class AgentQueryConfig:
    """Hierarchical agent-query encoder (METHOD §3.3, variant A1 + per-slot merging A2)."""

    # A1: layer-wise queries cross-attend to that layer's patch features. False reproduces the released code
    # (layer-wise queries are the image-independent Rein tokens).
    image_dependent: bool = True
    num_heads: int = 8
    # Number of layer groups after each progressive-merging stage; empty = 24→12→6→3 scaled to the depth.
    merge_stages: list[int] = field(default_factory=list)
    merge_dim: int = 512
    merge_heads: int = 8
    mlp_ratio: float = 4.0


@dataclass
class HeadConfig:
    """Refined Mask2Former head (METHOD §5, §6)."""

    num_classes: int = 19
    dim: int = 256
    num_heads: int = 8
    num_queries: int = 100
    # MSDeformAttn pixel decoder.
    pixel_decoder_layers: int = 6
    pixel_decoder_ffn: int = 1024
    msda_points: int = 4
    # Masked-attention transformer decoder.
    decoder_layers: int = 9
    decoder_ffn: int = 2048
    # Refinement module between pixel decoder and transformer decoder (METHOD §5).
    refine: bool = True
    refine_residual: bool = False


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    reins: ReinsConfig = field(default_factory=ReinsConfig)
    agent_queries: AgentQueryConfig = field(default_factory=AgentQueryConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    # ImageNet statistics in RGB, 0–255 scale (METHOD §7).
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])


@dataclass
class InferenceConfig:
    """Whole-image or sliding-window inference (METHOD §6.4)."""

    mode: str = "slide"  # "whole" | "slide"
    window: list[int] = field(default_factory=lambda: [512, 512])  # (h, w)
    stride: list[int] = field(default_factory=lambda: [341, 341])  # (h, w)
    # Slide mode: windows per forward pass (each holding the batch's images); lower it to save memory.
    window_batch: int = 8


DATASET_KINDS = ("synthetic", "cityscapes", "gta", "mapillary", "bdd", "acdc", "folder")


@dataclass
class DatasetSpec:
    """One dataset split in its published layout (METHOD §8)."""

    kind: str = "synthetic"  # one of DATASET_KINDS
    root: str = ""  # dataset root; for "synthetic", empty = data.synthetic.root
    split: str = "val"
    # Display name in tables (default: kind, or kind/domain|condition).
    name: str = ""
    # synthetic: domain ("source", "fog", "snow", ...); acdc: condition ("fog", "night", "rain", "snow").
    domain: str = ""
    # Test-time keep-ratio resize to fit (long, short); empty = keep the image size (METHOD §6.4).
    test_size: list[int] = field(default_factory=list)

    def display_name(self) -> str:
        return self.name or (f"{self.kind}/{self.domain}" if self.domain else self.kind)


@dataclass
class SyntheticDataConfig:
    """The embedded street scenes (DESIGN §7), generated once into ``root``."""

    root: str = "data/synthetic"
    seed: int = 0
    num_train: int = 200
    num_val: int = 30
    size: list[int] = field(default_factory=lambda: [256, 512])  # (h, w)


@dataclass
class DataConfig:
    train: DatasetSpec = field(default_factory=lambda: DatasetSpec(kind="synthetic", split="train", domain="source"))
    val: list[DatasetSpec] = field(default_factory=list)
    crop_size: int = 512
    # Short-edge resize scales are crop_size·k/10 for k in [scale_min, scale_max] (METHOD §7: 5..20).
    scale_min: int = 5
    scale_max: int = 20
    cat_max_ratio: float = 0.75
    num_workers: int = 2
    # Keep the training images decoded in memory after the first epoch (H·W·4 bytes each, per worker): worth it
    # for small data sets read many times over, such as the synthetic scenes.
    keep_decoded: bool = False
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)


@dataclass
class TeacherConfig:
    """Frozen diffusion teacher and the guidance losses (METHOD §4). Training only."""

    enabled: bool = True
    # Local diffusers folder (Stable Diffusion 2 / 2.1-base, or the tiny teacher made by `python -m train teacher`).
    path: str = ""
    t_weak: int = 0
    t_strong: int = 100
    # Hyperfeature aggregation resolution (METHOD §4.4: 64 for a 64x64 latent; 32 is a cheaper option).
    feature_size: int = 64
    bottleneck_dim: int = 256
    lambda_dist: float = 1.0
    lambda_sup: float = 1.0
    share_noise: bool = False
    seed: int = 2024


@dataclass
class TrainConfig:
    """Optimisation and run control (METHOD §7)."""

    iters: int = 40000
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    poly_power: float = 0.9
    min_lr: float = 0.0
    warmup_iters: int = 0
    warmup_ratio: float = 1e-6
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    amp: str = "auto"  # "auto" (bf16 on CUDA, off on CPU) | "bf16" | "fp16" | "off"
    # cuDNN times its convolution algorithms per input shape and keeps the fastest (METHOD §7: on); every
    # training crop has one shape, so the timing is paid once. Off: cuDNN's heuristic choice.
    cudnn_benchmark: bool = True
    seed: int = 42
    # Mask2Former loss (METHOD §6.3).
    num_points: int = 12544
    # Importance sampling of the mask-loss points: oversample ×3, keep the 75 % most uncertain (0 = uniform).
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    no_object_weight: float = 0.1
    # Loss weights, also the Hungarian matcher's cost weights (Mask2Former uses the same numbers for both).
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    log_interval: int = 50
    eval_interval: int = 4000
    checkpoint_interval: int = 4000
    out_dir: str = ""  # default runs/<config name>


@dataclass
class Config:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------------------
# Derived values (kept out of the schema so they can never disagree with it)
# --------------------------------------------------------------------------------------------------------------


def default_out_indices(depth: int) -> list[int]:
    """The paper's taps after blocks 7/11/15/23 of 24, scaled to `depth` (12 → 3/5/7/11, 4 → 0/1/2/3)."""
    return [max(0, round((i + 1) * depth / 24) - 1) for i in (7, 11, 15, 23)]


def default_merge_stages(depth: int) -> list[int]:
    """24 → 12 → 6 → 3: halve the number of layer groups three times (stopping at 1)."""
    stages, n = [], depth
    for _ in range(3):
        if n <= 1:
            break
        n = max(1, n // 2)
        stages.append(n)
    return stages


def out_indices(cfg: BackboneConfig) -> list[int]:
    return list(cfg.out_indices) if cfg.out_indices else default_out_indices(cfg.depth)


def merge_stages(model: ModelConfig) -> list[int]:
    aq = model.agent_queries
    return list(aq.merge_stages) if aq.merge_stages else default_merge_stages(model.backbone.depth)


# --------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------


def validate(cfg: Config) -> Config:
    """Cross-field checks. Raises ConfigError naming the key and the expected value."""
    b, r, a, h = cfg.model.backbone, cfg.model.reins, cfg.model.agent_queries, cfg.model.head

    def need(ok: bool, key: str, value: Any, expected: str) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}' = {value!r}: expected {expected}")

    for key, v in [("model.backbone.patch_size", b.patch_size), ("model.backbone.embed_dim", b.embed_dim),
                   ("model.backbone.depth", b.depth), ("model.backbone.num_heads", b.num_heads),
                   ("model.head.dim", h.dim), ("model.head.num_heads", h.num_heads),
                   ("model.head.num_queries", h.num_queries), ("model.head.num_classes", h.num_classes),
                   ("model.reins.token_length", r.token_length), ("model.reins.lora_dim", r.lora_dim)]:
        need(v > 0, key, v, "a positive integer")
    need(b.embed_dim % b.num_heads == 0, "model.backbone.num_heads", b.num_heads,
         f"a divisor of model.backbone.embed_dim ({b.embed_dim})")
    need(h.dim % h.num_heads == 0, "model.head.num_heads", h.num_heads, f"a divisor of model.head.dim ({h.dim})")
    need(b.embed_dim % a.num_heads == 0, "model.agent_queries.num_heads", a.num_heads,
         f"a divisor of model.backbone.embed_dim ({b.embed_dim})")
    need(a.merge_dim % a.merge_heads == 0, "model.agent_queries.merge_heads", a.merge_heads,
         f"a divisor of model.agent_queries.merge_dim ({a.merge_dim})")
    need(h.dim % 32 == 0, "model.head.dim", h.dim, "a multiple of 32 (GroupNorm(32) in the pixel decoder)")
    need(b.pos_grid_size % b.patch_size == 0, "model.backbone.pos_grid_size", b.pos_grid_size,
         f"a multiple of model.backbone.patch_size ({b.patch_size})")
    taps = out_indices(b)
    need(len(taps) == 4 and all(0 <= i < b.depth for i in taps) and taps == sorted(taps),
         "model.backbone.out_indices", b.out_indices, f"4 increasing block indices in [0, {b.depth})")
    if r.enabled:
        # The decoder's queries are the agent queries, one per Rein token (METHOD §3.4).
        need(h.num_queries == r.token_length, "model.head.num_queries", h.num_queries,
             f"equal to model.reins.token_length ({r.token_length})")
    stages = merge_stages(cfg.model)
    prev = b.depth
    for i, s in enumerate(stages):
        need(0 < s <= prev, f"model.agent_queries.merge_stages[{i}]", s, f"an integer in [1, {prev}]")
        prev = s
    need(len(cfg.model.pixel_mean) == 3, "model.pixel_mean", cfg.model.pixel_mean, "3 numbers (RGB)")
    need(len(cfg.model.pixel_std) == 3 and all(s > 0 for s in cfg.model.pixel_std), "model.pixel_std",
         cfg.model.pixel_std, "3 positive numbers (RGB)")
    d, t, tr = cfg.data, cfg.teacher, cfg.train
    for key, spec in [("data.train", d.train)] + [(f"data.val[{i}]", v) for i, v in enumerate(d.val)]:
        need(spec.kind in DATASET_KINDS, f"{key}.kind", spec.kind, f"one of {', '.join(DATASET_KINDS)}")
        need(not spec.test_size or (len(spec.test_size) == 2 and min(spec.test_size) > 0), f"{key}.test_size",
             spec.test_size, "[long, short] positive, or empty")
    need(d.crop_size > 0 and d.crop_size % 32 == 0, "data.crop_size", d.crop_size, "a positive multiple of 32")
    need(0 < d.scale_min <= d.scale_max, "data.scale_max", d.scale_max, f">= data.scale_min ({d.scale_min}) > 0")
    need(len(d.synthetic.size) == 2 and min(d.synthetic.size) >= 32, "data.synthetic.size", d.synthetic.size,
         "[h, w], each at least 32")
    need(0 <= t.t_weak <= t.t_strong < 1000, "teacher.t_strong", t.t_strong,
         f"an integer with teacher.t_weak ({t.t_weak}) <= t_strong < 1000")
    need(t.feature_size > 0, "teacher.feature_size", t.feature_size, "a positive integer")
    for key, v in [("train.iters", tr.iters), ("train.batch_size", tr.batch_size), ("train.grad_accum", tr.grad_accum),
                   ("train.num_points", tr.num_points), ("train.log_interval", tr.log_interval),
                   ("train.eval_interval", tr.eval_interval), ("train.checkpoint_interval", tr.checkpoint_interval)]:
        need(v > 0, key, v, "a positive integer")
    need(tr.lr > 0, "train.lr", tr.lr, "a positive number")
    # The schedule's keys: nonsense values would otherwise run (a negative poly power ends at 11,000 × lr).
    need(0 <= tr.min_lr <= tr.lr, "train.min_lr", tr.min_lr, f"a number in [0, train.lr ({tr.lr})]")
    need(tr.poly_power > 0, "train.poly_power", tr.poly_power, "a positive number")
    need(type(tr.warmup_iters) is int and tr.warmup_iters >= 0, "train.warmup_iters", tr.warmup_iters,
         "a non-negative integer")
    need(0 <= tr.warmup_ratio <= 1, "train.warmup_ratio", tr.warmup_ratio, "a number in [0, 1]")
    need(tr.weight_decay >= 0, "train.weight_decay", tr.weight_decay, "a non-negative number")
    need(tr.eps > 0, "train.eps", tr.eps, "a positive number")
    need(tr.grad_clip >= 0, "train.grad_clip", tr.grad_clip, "a non-negative number (0: off)")
    need(tr.oversample_ratio >= 1, "train.oversample_ratio", tr.oversample_ratio, "a number >= 1")
    need(0 <= tr.importance_sample_ratio <= 1, "train.importance_sample_ratio", tr.importance_sample_ratio,
         "a number in [0, 1]")
    need(len(tr.betas) == 2 and all(0 <= b_ < 1 for b_ in tr.betas), "train.betas", tr.betas,
         "[beta1, beta2] in [0, 1)")
    need(tr.amp in ("auto", "bf16", "fp16", "off"), "train.amp", tr.amp, "'auto', 'bf16', 'fp16' or 'off'")
    inf = cfg.inference
    need(inf.mode in ("whole", "slide"), "inference.mode", inf.mode, "'whole' or 'slide'")
    need(len(inf.window) == 2 and all(w > 0 and w % 32 == 0 for w in inf.window), "inference.window", inf.window,
         "[h, w], positive multiples of 32")
    need(len(inf.stride) == 2 and all(0 < s for s in inf.stride), "inference.stride", inf.stride,
         "[h, w], positive integers")
    # A stride beyond the window leaves pixels no window covers (mmseg asserts against it too).
    need(all(s <= w for s, w in zip(inf.stride, inf.window)), "inference.stride", inf.stride,
         f"no larger than inference.window {inf.window}")
    need(type(inf.window_batch) is int and inf.window_batch >= 1, "inference.window_batch", inf.window_batch,
         "a positive integer")
    return cfg


# --------------------------------------------------------------------------------------------------------------
# Building a dataclass tree from plain data, with errors that name the key
# --------------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' = {value!r}: expected a mapping of {_type_name(tp)} fields")
        return _from_dict(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}' = {value!r}: expected {tp}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' = {value!r}: expected a list of {_type_name(item)}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' = {value!r}: expected a mapping")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' = {value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' = {value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' = {value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' = {value!r}: expected a string")
        return value
    raise ConfigError(f"config key '{key}': unsupported field type {tp}")


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"unknown config key '{key}' (known: {', '.join(sorted(names))})")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from a (possibly partial) nested dict."""
    return validate(_from_dict(Config, data))


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. model.backbone.depth=4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected a dotted key such as model.head.dim")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings (values parsed as YAML) onto a copy of a nested dict (``data`` is left as it
    was: callers compare the two)."""
    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = _parse_override(text)
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                nxt = {}
                node[p] = nxt
            node = nxt
        node[parts[-1]] = value
    return data


def resolve_config_path(name_or_path: str | os.PathLike[str]) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if p.is_dir():
            raise ConfigError(f"config '{p}' is a folder: expected a YAML file or a shipped config name")
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        return p
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if not shipped.is_file():
        known = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"config '{name_or_path}' is neither a file nor a shipped config "
                          f"(shipped: {', '.join(known)})")
    return shipped


def yaml_problem(e: yaml.YAMLError) -> str:
    """One line for a YAML parse error: PyYAML's own message spans several, with a copy of the offending line."""
    problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {yaml_problem(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}': expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(name_or_path: str | os.PathLike[str] = "tiny", overrides: Sequence[str] = ()) -> Config:
    """Load a shipped config by name (``tiny``, ``vitl16_512`` …) or a YAML path, then apply dotted overrides.

    A YAML file may start with ``base: <name or path>`` to inherit from another config.
    """
    path = resolve_config_path(name_or_path)
    data = read_yaml(path)
    seen = {path.resolve()}
    while "base" in data:
        base_path = resolve_config_path(data.pop("base"))
        if base_path.resolve() in seen:
            raise ConfigError(f"config file '{path}': 'base' chain loops back to '{base_path}'")
        seen.add(base_path.resolve())
        data = _merge(read_yaml(base_path), data)
    data.setdefault("name", path.stem)
    try:
        return config_from_dict(apply_overrides(data, overrides))
    except ConfigError as e:
        if overrides:
            try:
                config_from_dict(data)
            except ConfigError:
                pass  # the file itself is wrong: name it
            else:
                raise ConfigError(f"key=value override: {e}") from None
        raise ConfigError(f"{path}: {e}") from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
