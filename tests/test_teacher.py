"""Diffusion teacher, hyperfeature aggregator and guidance losses (METHOD §4), on a random tiny diffusers folder.

The folder holds a 2-level AutoencoderKL (×2 downsampling) and a 4-level UNet2DConditionModel whose up blocks are
16/12/8 channels wide, so each of the nine maps can be told apart by its channel count and resolution.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file

from qd_core.config import Config, ConfigError, load_config
from qd_core.guidance import BottleneckBlock, GuidanceLoss, HyperfeatureAggregator, group_count
from qd_core.teacher import DiffusionTeacher, QueryDiffGuidance, build_guidance

MEAN = [123.675, 116.28, 103.53]
STD = [58.395, 57.12, 57.375]
SCALING = 0.37  # not SD's 0.18215, so a hard-coded constant would be caught
CONTEXT_DIM = 8
UP_CHANNELS = [16, 16, 16, 12, 12, 12, 8, 8, 8]  # up_blocks[1..3] of block_out_channels (8, 12, 16, 20), reversed
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    # Tensors here are tiny: intra-op threads only add synchronisation, which dominates on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                         sample_size=32, scaling_factor=SCALING)


def tiny_unet(layers_per_block: int = 2, levels: int = 4) -> UNet2DConditionModel:
    down = ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1)
    return UNet2DConditionModel(sample_size=16, block_out_channels=(8, 12, 16, 20)[:levels],
                                layers_per_block=layers_per_block, down_block_types=down, up_block_types=up,
                                cross_attention_dim=CONTEXT_DIM, attention_head_dim=2, norm_num_groups=4)


def write_core(folder: Path) -> None:
    torch.manual_seed(0)
    tiny_vae().save_pretrained(folder / "vae")
    tiny_unet().save_pretrained(folder / "unet")
    DDPMScheduler(**SD_SCHEDULE).save_pretrained(folder / "scheduler")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teacher folder whose empty-prompt context comes from empty_prompt.safetensors."""
    root = tmp_path_factory.mktemp("teacher")
    write_core(root)
    save_file({"embedding": torch.randn(1, 2, CONTEXT_DIM, generator=torch.Generator().manual_seed(1))},
              str(root / "empty_prompt.safetensors"))
    return root


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teacher folder with a CLIP tokenizer and text encoder, as Stable Diffusion 2 ships."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("teacher_text")
    write_core(root)
    vocab, merges = root / "vocab.json", root / "merges.txt"
    vocab.write_text('{"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "a": 3}')
    merges.write_text("#version: 0.2\n")
    CLIPTokenizer(str(vocab), str(merges), model_max_length=8).save_pretrained(root / "tokenizer")
    config = CLIPTextConfig(vocab_size=4, hidden_size=CONTEXT_DIM, intermediate_size=16, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    CLIPTextModel(config).save_pretrained(root / "text_encoder")
    return root


@pytest.fixture(scope="module")
def teacher(folder: Path) -> DiffusionTeacher:
    return DiffusionTeacher.from_folder(folder, pixel_mean=MEAN, pixel_std=STD)


def normalised_images(b: int = 2, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(RGB in [0, 255], the same ImageNet-normalised), each (b, 3, size, size)."""
    rgb = torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 255
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return rgb, (rgb - mean) / std


def sd_alphas_cumprod() -> np.ndarray:
    """ᾱ_t of SD's scaled-linear schedule, in float64, from its definition."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


# ------------------------------------------------------------------------------------------------------------------
# Teacher: features
# ------------------------------------------------------------------------------------------------------------------


def test_forward_returns_nine_maps_per_noise_level_from_up_blocks_1_to_3(teacher: DiffusionTeacher) -> None:
    _, x = normalised_images(b=2, size=32)
    weak, strong = teacher(x)
    # 32 px → latent 16 (VAE ×2) → UNet levels 16/8/4/2: up_blocks[1] runs at 4, [2] at 8, [3] at 16.
    expected = [(2, c, s, s) for c, s in zip(UP_CHANNELS, [4] * 3 + [8] * 3 + [16] * 3)]
    assert [tuple(m.shape) for m in weak] == expected
    assert [tuple(m.shape) for m in strong] == expected
    assert teacher.channels == UP_CHANNELS


def test_the_unet_sees_t_weak_for_the_first_half_and_t_strong_for_the_second(folder: Path) -> None:
    """One UNet pass of 2B samples: the weak maps are those of z_weak at t_weak, the strong ones of z_strong at
    t_strong, each equal to a separate pass."""
    t = DiffusionTeacher.from_folder(folder, pixel_mean=MEAN, pixel_std=STD, t_weak=3, t_strong=500)
    seen = []
    handle = t.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[1].clone()), with_kwargs=True)
    try:
        _, x = normalised_images(b=2)
        t.reset_noise(5)
        weak, strong = t(x)
    finally:
        handle.remove()
    assert [s.tolist() for s in seen] == [[3, 3, 500, 500]]
    t.reset_noise(5)
    with torch.no_grad():
        z_weak, z_strong = t.noised_latents(t.encode(x))
        alone_weak = t.unet_features(z_weak, torch.full((2,), 3))
        alone_strong = t.unet_features(z_strong, torch.full((2,), 500))
    for a, b in zip(weak + strong, alone_weak + alone_strong):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # And the two levels differ: a swap or one level twice would not.
    assert not torch.allclose(weak[0], strong[0], atol=1e-3)


def test_the_cpu_teacher_ignores_the_callers_autocast(teacher: DiffusionTeacher) -> None:
    """train.amp=bf16 on a CPU must not turn the fp32 teacher into a bf16 one (its features would change by ~2 %)."""
    _, x = normalised_images()
    teacher.reset_noise(3)
    plain = teacher(x)[0]
    teacher.reset_noise(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = teacher(x)[0]
    for a, b in zip(plain, under_autocast):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_close_removes_the_hooks_and_a_second_teacher_on_the_same_unet_has_its_own(folder: Path) -> None:
    first = DiffusionTeacher.from_folder(folder, pixel_mean=MEAN, pixel_std=STD)
    conv = first.unet.up_blocks[1].resnets[0].conv2
    hooks_before = len(conv._forward_hooks)
    second = DiffusionTeacher(first.vae, first.unet, first.scheduler, first.empty_prompt, pixel_mean=MEAN,
                              pixel_std=STD)
    assert len(conv._forward_hooks) == hooks_before + 1
    _, x = normalised_images()
    first.reset_noise(2)
    second.reset_noise(2)
    for a, b in zip(first(x)[0], second(x)[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    first.close()
    assert len(conv._forward_hooks) == hooks_before
    with pytest.raises(RuntimeError, match="closed"):
        first(x)
    assert len(second(x)[0]) == 9


def test_maps_are_the_residual_branch_before_the_shortcut_add(teacher: DiffusionTeacher) -> None:
    resnets = [teacher.unet.up_blocks[i].resnets[j] for i in (1, 2, 3) for j in (0, 1, 2)]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles = [r.register_forward_hook(lambda m, inp, out: seen.append((inp[0], out))) for r in resnets]
    try:
        z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            maps = teacher.unet_features(z, torch.tensor([0, 100]))
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == 9
    with torch.no_grad():
        for k, (resnet, (inp, out), m) in enumerate(zip(resnets, seen, maps)):
            shortcut = resnet.conv_shortcut(inp) if resnet.conv_shortcut is not None else inp
            branch = out * resnet.output_scale_factor - shortcut
            # fp32: the branch is recovered by one add and one subtract of O(1) values.
            torch.testing.assert_close(m, branch, rtol=1e-5, atol=1e-5, msg=f"map {k}")
            assert not torch.allclose(m, out, atol=1e-3), f"map {k} is the block output, not the residual branch"


def test_latent_is_scaled_posterior_mean_of_the_denormalised_image(teacher: DiffusionTeacher, folder: Path) -> None:
    rgb, x = normalised_images(b=2, size=32, seed=5)
    vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True).eval()
    assert vae.config.scaling_factor == pytest.approx(SCALING)
    with torch.no_grad():
        expected = vae.encode(rgb / 127.5 - 1.0).latent_dist.mean * SCALING
        z0 = teacher.encode(x)
    # fp32, same weights: only the de-normalisation round trip differs (~1e-5 of 255).
    torch.testing.assert_close(z0, expected, rtol=1e-4, atol=1e-5)


def test_sd_schedule_reference_matches_the_method_numbers() -> None:
    ac = sd_alphas_cumprod()
    assert math.sqrt(1 - ac[0]) == pytest.approx(0.0292, abs=1e-4)
    assert math.sqrt(ac[100]) == pytest.approx(0.9456, abs=1e-4)
    assert math.sqrt(1 - ac[100]) == pytest.approx(0.3252, abs=1e-4)


@pytest.mark.parametrize("level", ["weak", "strong"])
def test_noise_at_t_weak_and_t_strong_has_the_schedule_statistics(teacher: DiffusionTeacher, level: str) -> None:
    ac = sd_alphas_cumprod()[0 if level == "weak" else 100]
    z0 = torch.ones(1, 4, 256, 256)
    z_weak, z_strong = teacher.noised_latents(z0)
    z = z_weak if level == "weak" else z_strong
    n = z.numel()
    # 262144 normal samples: the std estimate has relative error ~1/sqrt(2n) = 0.14%, the mean error
    # std/sqrt(n) < 0.07%; the tolerances are ~5 standard errors.
    assert z.mean().item() == pytest.approx(math.sqrt(ac), abs=5 * math.sqrt(1 - ac) / math.sqrt(n))
    assert z.std().item() == pytest.approx(math.sqrt(1 - ac), rel=5 / math.sqrt(2 * n))
    assert teacher.alphas_cumprod(0 if level == "weak" else 100) == pytest.approx(ac, rel=1e-6)


def _correlation(z_a: torch.Tensor, z_b: torch.Tensor) -> float:
    """Correlation of the noises behind two noised zero latents (each is ε scaled by a constant)."""
    return torch.corrcoef(torch.stack([z_a.flatten(), z_b.flatten()]))[0, 1].item()


# 4096 values: independent noises correlate by ~N(0, 1/64), shared ones by 1 up to fp32 rounding.
ZERO_LATENT = (1, 4, 32, 32)


def test_noise_is_fresh_per_level_and_call_and_reproducible_from_the_seed(folder: Path) -> None:
    a = DiffusionTeacher.from_folder(folder, pixel_mean=MEAN, pixel_std=STD, seed=7)
    b = DiffusionTeacher.from_folder(folder, pixel_mean=MEAN, pixel_std=STD, seed=7)
    z0 = torch.zeros(ZERO_LATENT)
    first_w, first_s = a.noised_latents(z0)
    second_w, second_s = a.noised_latents(z0)
    assert abs(_correlation(first_w, first_s)) < 0.1, "weak and strong must use different noise"
    assert abs(_correlation(first_w, second_w)) < 0.1, "each call must draw fresh noise"
    assert abs(_correlation(first_s, second_s)) < 0.1, "each call must draw fresh noise"
    torch.testing.assert_close(b.noised_latents(z0)[0], first_w, rtol=0, atol=0)
    a.reset_noise()
    torch.testing.assert_close(a.noised_latents(z0)[0], first_w, rtol=0, atol=0)
    c = DiffusionTeacher.from_folder(folder, pixel_mean=MEAN, pixel_std=STD, seed=8)
    assert abs(_correlation(c.noised_latents(z0)[0], first_w)) < 0.1


def test_share_noise_uses_one_noise_for_both_levels(folder: Path) -> None:
    t = DiffusionTeacher.from_folder(folder, pixel_mean=MEAN, pixel_std=STD, share_noise=True)
    z_w, z_s = t.noised_latents(torch.zeros(ZERO_LATENT))
    assert _correlation(z_w, z_s) == pytest.approx(1.0, abs=1e-4)


def test_unet_gets_the_empty_prompt_repeated_over_the_batch(teacher: DiffusionTeacher, folder: Path) -> None:
    from safetensors.torch import load_file

    contexts = []
    handle = teacher.unet.register_forward_pre_hook(
        lambda m, args, kwargs: contexts.append(kwargs["encoder_hidden_states"]), with_kwargs=True)
    try:
        teacher(normalised_images(b=3)[1])
    finally:
        handle.remove()
    saved = load_file(str(folder / "empty_prompt.safetensors"))["embedding"]
    assert len(contexts) >= 1
    for context in contexts:
        torch.testing.assert_close(context, saved.expand(context.shape[0], -1, -1), rtol=0, atol=0)
    assert sum(c.shape[0] for c in contexts) == 2 * 3  # both noise levels of the 3 images


def test_empty_prompt_is_encoded_once_from_bos_eos(text_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer, CLIPTextModel

    encoder = CLIPTextModel.from_pretrained(text_folder / "text_encoder", local_files_only=True).eval()
    ids = AutoTokenizer.from_pretrained(text_folder / "tokenizer", local_files_only=True)("").input_ids
    assert ids == [0, 1]  # BOS, EOS: no padding
    with torch.no_grad():
        expected = encoder(torch.tensor([ids])).last_hidden_state

    calls = []
    original = CLIPTextModel.forward

    def counting(self: nn.Module, *args: object, **kwargs: object) -> object:
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CLIPTextModel, "forward", counting)
    t = DiffusionTeacher.from_folder(text_folder, pixel_mean=MEAN, pixel_std=STD)
    x = normalised_images(b=1)[1]
    t(x)
    t(x)
    assert len(calls) == 1
    torch.testing.assert_close(t.empty_prompt, expected, rtol=1e-6, atol=1e-6)
    assert not any(isinstance(m, CLIPTextModel) for m in t.modules()), "the text encoder must not be kept"


def test_teacher_is_frozen_and_stays_in_eval_mode(teacher: DiffusionTeacher) -> None:
    teacher.train()
    assert not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    _, x = normalised_images(b=1)
    weak, strong = teacher(x.requires_grad_(True))
    assert not any(m.requires_grad for m in weak + strong)


# ------------------------------------------------------------------------------------------------------------------
# Teacher: bad folders and UNets
# ------------------------------------------------------------------------------------------------------------------


def _make_partial(root: Path, parts: str) -> Path:
    root.mkdir()
    torch.manual_seed(0)
    if "v" in parts:
        tiny_vae().save_pretrained(root / "vae")
    if "u" in parts:
        tiny_unet().save_pretrained(root / "unet")
    if "s" in parts:
        DDPMScheduler(**SD_SCHEDULE).save_pretrained(root / "scheduler")
    return root


@pytest.mark.parametrize("parts, missing", [("", "vae/"), ("v", "unet/"), ("vu", "scheduler/"),
                                            ("vus", "empty_prompt.safetensors")])
def test_a_folder_that_is_not_a_teacher_folder_is_named_in_the_error(tmp_path: Path, parts: str, missing: str) -> None:
    root = _make_partial(tmp_path / "not_sd", parts)
    with pytest.raises(ValueError, match=r"not_sd.*" + missing.replace(".", r"\.")):
        DiffusionTeacher.from_folder(root, pixel_mean=MEAN, pixel_std=STD)


def test_a_missing_folder_or_hub_id_is_named_in_the_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="stabilityai/stable-diffusion-2.*does not exist"):
        DiffusionTeacher.from_folder("stabilityai/stable-diffusion-2", pixel_mean=MEAN, pixel_std=STD)


def test_a_single_checkpoint_file_gets_the_conversion_hint(tmp_path: Path) -> None:
    (tmp_path / "v2-1_512-ema-pruned.safetensors").write_bytes(b"weights")
    with pytest.raises(ValueError, match="single checkpoint file.*from_single_file"):
        DiffusionTeacher.from_folder(tmp_path / "v2-1_512-ema-pruned.safetensors", pixel_mean=MEAN, pixel_std=STD)


def test_a_home_relative_folder_is_expanded(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(folder.parent))
    t = DiffusionTeacher.from_folder(f"~/{folder.name}", pixel_mean=MEAN, pixel_std=STD)
    assert t.channels == UP_CHANNELS


def test_a_unet_with_missing_weights_is_refused_not_filled_at_random(tmp_path: Path, folder: Path) -> None:
    """diffusers fills weights missing from the file with random values and only logs a warning: a partial
    download would then guide the student with noise."""
    import shutil

    from safetensors.torch import load_file

    root = tmp_path / "partial"
    shutil.copytree(folder, root)
    weights = next((root / "unet").glob("*.safetensors"))
    state = load_file(str(weights))
    save_file({k: v for k, v in state.items() if not k.startswith("up_blocks.3.")}, str(weights))
    with pytest.raises(ValueError, match=r"partial.*unet/ weights do not match its config: \d+ missing keys "
                                         r"\(up_blocks\.3\."):
        DiffusionTeacher.from_folder(root, pixel_mean=MEAN, pixel_std=STD)


def test_a_corrupt_empty_prompt_file_is_named_in_one_line(tmp_path: Path, folder: Path) -> None:
    import shutil

    root = tmp_path / "corrupt_prompt"
    shutil.copytree(folder, root)
    prompt = root / "empty_prompt.safetensors"
    prompt.write_bytes(prompt.read_bytes()[:-8])
    with pytest.raises(ValueError, match=r"corrupt_prompt.*could not load empty_prompt.safetensors") as info:
        DiffusionTeacher.from_folder(root, pixel_mean=MEAN, pixel_std=STD)
    assert "\n" not in str(info.value)


def test_a_folder_with_unloadable_weights_is_named_in_the_error(tmp_path: Path, folder: Path) -> None:
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(folder, root)
    for weights in (root / "unet").glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"broken.*unet/"):
        DiffusionTeacher.from_folder(root, pixel_mean=MEAN, pixel_std=STD)


@pytest.mark.parametrize("levels, layers, message", [(3, 2, "at least 4 up blocks"), (4, 1, "at least 3")])
def test_a_unet_without_three_resnets_in_four_up_blocks_is_rejected(levels: int, layers: int, message: str) -> None:
    unet = tiny_unet(layers_per_block=layers, levels=levels)
    with pytest.raises(ValueError, match=message):
        DiffusionTeacher(tiny_vae(), unet, DDPMScheduler(**SD_SCHEDULE), torch.zeros(1, 2, CONTEXT_DIM),
                         pixel_mean=MEAN, pixel_std=STD)


def test_an_empty_prompt_of_the_wrong_width_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"empty_prompt: expected shape \(1, T, 8\)"):
        DiffusionTeacher(tiny_vae(), tiny_unet(), DDPMScheduler(**SD_SCHEDULE), torch.zeros(1, 2, 5),
                         pixel_mean=MEAN, pixel_std=STD)


# ------------------------------------------------------------------------------------------------------------------
# Hyperfeature aggregator
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels, groups", [(256, 32), (1024, 32), (8, 8), (48, 24), (7, 7)])
def test_group_norm_uses_32_groups_or_the_largest_divisor_below(channels: int, groups: int) -> None:
    assert group_count(channels) == groups


def test_bottleneck_block_is_the_resnet_bottleneck_with_projection_shortcut() -> None:
    torch.manual_seed(0)
    block = BottleneckBlock(6, 8, 12)
    x = torch.randn(2, 6, 5, 5)

    def gn(y: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
        return F.group_norm(y, norm.num_groups, norm.weight, norm.bias, norm.eps)

    y = F.relu(gn(F.conv2d(x, block.conv1.weight), block.norm1))
    y = F.relu(gn(F.conv2d(y, block.conv2.weight, padding=1), block.norm2))
    y = gn(F.conv2d(y, block.conv3.weight), block.norm3)
    expected = F.relu(y + gn(F.conv2d(x, block.shortcut.weight), block.shortcut_norm))
    assert block.conv1.kernel_size == (1, 1) and block.conv2.kernel_size == (3, 3) and block.conv3.kernel_size == (1, 1)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_aggregator_is_the_softmax_weighted_sum_of_resized_blocks_as_tokens() -> None:
    torch.manual_seed(0)
    agg = HyperfeatureAggregator(UP_CHANNELS, out_dim=10, feature_size=6, bottleneck_dim=8)
    with torch.no_grad():
        agg.mixing_logits.copy_(torch.randn(9))
    maps = [torch.randn(2, c, s, s) for c, s in zip(UP_CHANNELS, [4] * 3 + [8] * 3 + [16] * 3)]
    weights = torch.softmax(agg.mixing_logits.detach(), 0)
    expected = sum(w * block(F.interpolate(m, size=(6, 6), mode="bilinear", align_corners=False))
                   for w, block, m in zip(weights, agg.blocks, maps))
    tokens = agg(maps)
    assert tokens.shape == (2, 36, 10)
    # Row-major positions: token y·s + x is pixel (y, x).
    torch.testing.assert_close(tokens, expected.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens[:, 1 * 6 + 4], expected[:, :, 1, 4], rtol=1e-5, atol=1e-5)


def test_aggregator_starts_with_equal_mixing_weights() -> None:
    agg = HyperfeatureAggregator(UP_CHANNELS, out_dim=4, feature_size=2, bottleneck_dim=4)
    torch.testing.assert_close(agg.mixing_logits.softmax(0), torch.full((9,), 1 / 9))


def test_aggregator_rejects_maps_with_the_wrong_channels() -> None:
    agg = HyperfeatureAggregator(UP_CHANNELS, out_dim=4, feature_size=2, bottleneck_dim=4)
    maps = [torch.randn(1, c, 4, 4) for c in UP_CHANNELS]
    maps[4] = torch.randn(1, 5, 4, 4)
    with pytest.raises(ValueError, match=r"maps\[4\]: expected shape \(1, 12, h, w\)"):
        agg(maps)
    with pytest.raises(ValueError, match="expected 9 feature maps"):
        agg(maps[:8])
    with pytest.raises(ValueError, match="channels: expected 9"):
        HyperfeatureAggregator(UP_CHANNELS[:8], out_dim=4, feature_size=2, bottleneck_dim=4)


# ------------------------------------------------------------------------------------------------------------------
# Guidance losses
# ------------------------------------------------------------------------------------------------------------------


def _loss_inputs(b: int = 2, n: int = 5, m: int = 7, d: int = 12
                 ) -> tuple[GuidanceLoss, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    loss = GuidanceLoss(d)
    return loss, torch.randn(b, n, d) * 2, torch.randn(b, m, d), torch.randn(b, m, d) * 3


def _linear64(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x.double() @ layer.weight.double().T + layer.bias.double()


def _similarity64(loss: GuidanceLoss, q: torch.Tensor, fw: torch.Tensor) -> torch.Tensor:
    p, k = _linear64(loss.query_proj, q), _linear64(loss.key_proj, fw)
    logits = torch.einsum("bnd,bmd->bnm", p, k) / math.sqrt(q.shape[-1])
    return torch.exp(logits - logits.logsumexp(-1, keepdim=True))


def _dist64(loss: GuidanceLoss, q: torch.Tensor, fw: torch.Tensor, fs: torch.Tensor) -> float:
    """L_dist from its definition in float64."""
    s = _similarity64(loss, q, fw)  # (B, N, M)
    f_hat = _linear64(loss.out_mlp, torch.einsum("bnm,bnd->bmd", s, _linear64(loss.value_proj, q)))
    target = torch.softmax(fs.double(), -1)
    log_p = f_hat - f_hat.logsumexp(-1, keepdim=True)
    return ((target * (target.log() - log_p)).sum() / q.shape[0]).item()


def _sup64(loss: GuidanceLoss, q: torch.Tensor, fw: torch.Tensor) -> float:
    """L_sup from its definition in float64 (smooth L1 with β = 1)."""
    target = torch.einsum("bnm,bmd->bnd", _similarity64(loss, q, fw), fw.double())
    diff = (q.double() - target).abs()
    return torch.where(diff < 1, 0.5 * diff ** 2, diff - 0.5).mean().item()


def test_distribution_loss_is_kl_of_channel_softmaxes_summed_and_divided_by_batch() -> None:
    loss, q, fw, fs = _loss_inputs()
    # fp32 against float64, a sum of B·M = 14 KL terms of O(1): 1e-5 relative.
    assert loss(q, fw, fs)["loss_dist"].item() == pytest.approx(_dist64(loss, q, fw, fs), rel=1e-5)


def test_supervision_loss_is_smooth_l1_to_the_attended_weak_features() -> None:
    loss, q, fw, fs = _loss_inputs()
    assert loss(q, fw, fs)["loss_sup"].item() == pytest.approx(_sup64(loss, q, fw), rel=1e-5)


def test_losses_are_computed_in_fp32_under_autocast() -> None:
    loss, q, fw, fs = _loss_inputs(n=20, m=30, d=64)
    q, fw, fs = q.bfloat16(), fw.bfloat16(), fs.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = loss(q, fw, fs)
    assert auto["loss_dist"].dtype == auto["loss_sup"].dtype == torch.float32
    # The float64 reference sees the same bf16-rounded inputs; fp32 arithmetic stays within 1e-5 of it, while
    # bf16 projections (8-bit mantissa) would be off by ~1e-3 or more.
    assert auto["loss_dist"].item() == pytest.approx(_dist64(loss, q, fw, fs), rel=1e-5)
    assert auto["loss_sup"].item() == pytest.approx(_sup64(loss, q, fw), rel=1e-5)


def test_loss_rejects_mismatched_shapes() -> None:
    loss, q, fw, fs = _loss_inputs()
    with pytest.raises(ValueError, match=r"queries: expected shape \(B, N, 12\)"):
        loss(q[..., :5], fw, fs)
    with pytest.raises(ValueError, match="strong: expected the shape of weak"):
        loss(q, fw, fs[:, :3])


# ------------------------------------------------------------------------------------------------------------------
# QueryDiffGuidance and build_guidance
# ------------------------------------------------------------------------------------------------------------------


def _cfg(path: Path | str, *extra: str) -> Config:
    return load_config("tiny", overrides=[f"teacher.path={path}", "teacher.feature_size=8",
                                          "teacher.bottleneck_dim=8", *extra])


@pytest.fixture
def guidance(folder: Path) -> QueryDiffGuidance:
    torch.manual_seed(0)
    g = build_guidance(_cfg(folder))
    assert g is not None
    return g


def _queries(d: int = 64) -> torch.Tensor:
    return torch.randn(2, 5, d, generator=torch.Generator().manual_seed(4)).requires_grad_(True)


def _grad_norms(module: nn.Module) -> dict[str, float]:
    return {n: (0.0 if p.grad is None else p.grad.abs().sum().item()) for n, p in module.named_parameters()}


def test_supervision_loss_sends_gradient_to_the_queries_only(guidance: QueryDiffGuidance) -> None:
    q = _queries()
    guidance(normalised_images()[1], q)["loss_sup"].backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert all(v == 0 for v in _grad_norms(guidance).values()), _grad_norms(guidance)
    assert all(p.grad is None for p in guidance.teacher.parameters())


def test_distribution_loss_trains_queries_projections_and_aggregator(guidance: QueryDiffGuidance) -> None:
    q = _queries()
    guidance(normalised_images()[1], q)["loss_dist"].backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    grads = _grad_norms(guidance)
    for name in ("query_proj", "key_proj", "value_proj", "out_mlp"):
        assert grads[f"loss.{name}.weight"] > 0 and grads[f"loss.{name}.bias"] > 0, name
    assert grads["aggregator.mixing_logits"] > 0
    for k in range(9):
        assert grads[f"aggregator.blocks.{k}.conv1.weight"] > 0, k
    assert all(p.grad is None for p in guidance.teacher.parameters())


def test_state_dict_and_parameters_hold_only_aggregator_and_loss(guidance: QueryDiffGuidance) -> None:
    keys = list(guidance.state_dict())
    assert keys and all(k.startswith(("aggregator.", "loss.")) for k in keys), keys
    teacher_ids = {id(p) for p in guidance.teacher.parameters()}
    assert teacher_ids and not teacher_ids & {id(p) for p in guidance.parameters()}
    assert not any(isinstance(m, DiffusionTeacher) for m in guidance.modules())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_to_moves_the_teacher_too_and_the_guidance_still_runs(guidance: QueryDiffGuidance, dtype: torch.dtype) -> None:
    guidance.to(dtype)
    assert guidance.teacher.unet.dtype == dtype and guidance.teacher.empty_prompt.dtype == dtype
    assert guidance.aggregator.mixing_logits.dtype == dtype
    # The teacher returns fp32 maps; the converted aggregator and loss must still take them.
    out = guidance(normalised_images()[1].to(dtype), _queries().detach().to(dtype))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values()), out


def test_losses_are_weighted_by_the_config_lambdas(folder: Path) -> None:
    torch.manual_seed(0)
    g = build_guidance(_cfg(folder, "teacher.lambda_dist=2.0", "teacher.lambda_sup=3.0"))
    assert g is not None
    _, x = normalised_images()
    q = _queries()
    g.teacher.reset_noise(11)
    weighted = g(x, q)
    g.teacher.reset_noise(11)
    weak, strong = g.teacher(x)
    raw = g.loss(q, g.aggregator(weak), g.aggregator(strong))
    assert set(weighted) == {"loss_dist", "loss_sup"}
    assert weighted["loss_dist"].item() == pytest.approx(2 * raw["loss_dist"].item(), rel=1e-6)
    assert weighted["loss_sup"].item() == pytest.approx(3 * raw["loss_sup"].item(), rel=1e-6)


def test_guidance_rejects_queries_of_another_width_or_batch(guidance: QueryDiffGuidance) -> None:
    _, x = normalised_images(b=2)
    with pytest.raises(ValueError, match=r"agent_queries: expected shape \(B, N, 64\)"):
        guidance(x, torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match=r"images_norm: expected shape \(3, 3, H, W\)"):
        guidance(x, torch.randn(3, 5, 64))


def test_build_guidance_is_none_when_the_teacher_is_disabled() -> None:
    assert build_guidance(load_config("tiny", overrides=["teacher.enabled=false"])) is None


def test_build_guidance_names_teacher_path_when_empty_or_not_a_teacher(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'teacher.path' is empty"):
        build_guidance(load_config("tiny", overrides=["teacher.path="]))
    (tmp_path / "plain").mkdir()
    with pytest.raises(ConfigError, match=r"'teacher.path' = '.*plain'.*vae/"):
        build_guidance(_cfg(tmp_path / "plain"))


def test_build_guidance_sizes_the_aggregator_from_teacher_and_config(guidance: QueryDiffGuidance) -> None:
    assert guidance.aggregator.channels == UP_CHANNELS
    assert guidance.aggregator.out_dim == 64 and guidance.aggregator.feature_size == 8
    assert guidance.loss.dim == 64
    assert (guidance.teacher.t_weak, guidance.teacher.t_strong, guidance.teacher.seed) == (0, 100, 2024)
