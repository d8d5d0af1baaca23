"""Frozen Stable Diffusion teacher and the diffusion guidance wrapper (METHOD §4, training only).

    images (B, 3, H, W), ImageNet-normalised
      → de-normalise to 0–255 → x/127.5 − 1 → VAE posterior mean × scaling_factor → z0
      → z_t = √ᾱ_t·z0 + √(1−ᾱ_t)·ε for t ∈ (t_weak, t_strong), one UNet pass with the empty-prompt context
      → residual-branch outputs of up_blocks[1..3].resnets[0..2] → 2 × 9 maps (B, C_k, h_k, w_k)
      → HyperfeatureAggregator → F_w, F_s (B, M, D) → GuidanceLoss with the agent queries Q (B, N, D)

    guidance = build_guidance(cfg, device)      # None when cfg.teacher.enabled is false
    losses = guidance(images, student_out.agent_queries)   # {"loss_dist": ..., "loss_sup": ...}, weighted

The teacher is read from a local diffusers folder only (Stable Diffusion 2 / 2.1-base, or the tiny teacher of
``python -m train teacher``); diffusers and transformers are imported when a folder is loaded, not before.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import Tensor, nn

from qd_core.config import Config, ConfigError
from qd_core.guidance import NUM_HYPERFEATURE_MAPS, GuidanceLoss, HyperfeatureAggregator

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

EMPTY_PROMPT_FILE = "empty_prompt.safetensors"
EMPTY_PROMPT_KEY = "embedding"
# METHOD §4.3: the three ResNet blocks of up_blocks[1], [2] and [3] (Hyperfeatures also uses up_blocks[0]).
FEATURE_BLOCKS = ((1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2))

__all__ = [
    "DiffusionTeacher", "GuidanceLoss", "HyperfeatureAggregator", "QueryDiffGuidance", "build_guidance",
    "diffusers_folder_problem",
]


def diffusers_folder_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot serve as a teacher folder, or None when it has every part the teacher reads."""
    root = Path(path).expanduser()
    if root.is_file():
        return ("a single checkpoint file, not a diffusers folder (convert it once: diffusers' "
                "StableDiffusionPipeline.from_single_file(FILE).save_pretrained(DIR), then use DIR)")
    if not root.is_dir():
        return "folder does not exist (expected a local diffusers folder with vae/, unet/ and scheduler/)"
    needed = {"vae": "config.json", "unet": "config.json", "scheduler": "scheduler_config.json"}
    missing = [f"{sub}/" for sub, config in needed.items() if not (root / sub / config).is_file()]
    if missing:
        return (f"no {' or '.join(missing)} subfolder with its config (a diffusers folder as written by "
                f"save_pretrained has vae/, unet/ and scheduler/)")
    has_text = (root / "text_encoder").is_dir() and (root / "tokenizer").is_dir()
    if not has_text and not (root / EMPTY_PROMPT_FILE).is_file():
        return f"neither text_encoder/ + tokenizer/ nor {EMPTY_PROMPT_FILE} to make the empty-prompt context from"
    return None


def _load(what: str, root: Path, load: Callable[[], Any]) -> Any:
    try:
        return load()
    except Exception as err:  # noqa: BLE001 -- diffusers, transformers and safetensors each raise their own kinds
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        sub = root / what.rstrip("/")
        if sub.is_dir() and not any(sub.glob("*.bin")) and not any(
                p for p in sub.glob("*.safetensors") if ".fp16." not in p.name) and any(sub.glob("*.fp16.*")):
            reason += " (the folder holds only fp16-variant weights, *.fp16.*; save it again without variant)"
        raise ValueError(f"teacher folder '{root}': could not load {what} ({reason})") from None


def _load_model(what: str, root: Path, cls: Any, **kwargs: Any) -> nn.Module:
    """``cls.from_pretrained(root, subfolder=what)`` that refuses missing, unexpected or mismatched weights:
    diffusers fills missing ones with random values and only logs a warning (a partial download, or another
    model's folder with a compatible config, would then teach the student noise)."""
    model, info = _load(f"{what}/", root, lambda: cls.from_pretrained(root, subfolder=what,
                                                                       output_loading_info=True, **kwargs))
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = [k if isinstance(k, str) else k[0] for k in info.get(kind) or []]
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            raise ValueError(f"teacher folder '{root}': {what}/ weights do not match its config: "
                             f"{len(keys)} {kind.replace('_', ' ')} ({shown})")
    return model


def _empty_prompt_embedding(root: Path, device: torch.device | str | None) -> Tensor:
    """The context of the prompt "" (1, T, C), computed here once: BOS, EOS without padding through the text
    encoder when the folder has one (METHOD §4.1), else read from ``empty_prompt.safetensors``."""
    if (root / "text_encoder").is_dir() and (root / "tokenizer").is_dir():
        from transformers import AutoModel, AutoTokenizer

        tokenizer = _load("tokenizer/", root, lambda: AutoTokenizer.from_pretrained(root / "tokenizer",
                                                                                   local_files_only=True))
        encoder = _load("text_encoder/", root, lambda: AutoModel.from_pretrained(root / "text_encoder",
                                                                                local_files_only=True))
        encoder = encoder.to(device or "cpu").eval()
        ids = tokenizer("", padding="do_not_pad", return_tensors="pt").input_ids.to(device or "cpu")
        with torch.no_grad():
            embedding = encoder(ids)[0].float()
        del encoder  # only its output is kept: the text encoder is never run again
    else:
        from safetensors.torch import load_file

        tensors = _load(EMPTY_PROMPT_FILE, root, lambda: load_file(str(root / EMPTY_PROMPT_FILE)))
        if EMPTY_PROMPT_KEY not in tensors:
            raise ValueError(f"teacher folder '{root}': {EMPTY_PROMPT_FILE} has no key '{EMPTY_PROMPT_KEY}' "
                             f"(keys: {', '.join(sorted(tensors)) or 'none'})")
        embedding = tensors[EMPTY_PROMPT_KEY].float()
    if embedding.dim() != 3 or embedding.shape[0] != 1:
        raise ValueError(f"teacher folder '{root}': empty-prompt embedding has shape {tuple(embedding.shape)}, "
                         f"expected (1, T, C)")
    return embedding


class DiffusionTeacher(nn.Module):
    """Frozen VAE + UNet returning the weak- and strong-noise hyperfeature maps of a batch (METHOD §4.1–4.3).

    empty_prompt: (1, T, C) context of the prompt "" (C = the UNet's cross_attention_dim), repeated over the
    batch at every call. Always in eval mode and without gradients; the text encoder is not kept.
    """

    def __init__(self, vae: "AutoencoderKL", unet: "UNet2DConditionModel", scheduler: "DDPMScheduler",
                 empty_prompt: Tensor, *, pixel_mean: Sequence[float], pixel_std: Sequence[float], t_weak: int = 0,
                 t_strong: int = 100, seed: int = 2024, share_noise: bool = False) -> None:
        super().__init__()
        # Channels-last convolution weights make every convolution of the frozen VAE and UNet run channels-last
        # (oneDNN's blocked kernels on CPU, cuDNN's NHWC ones on GPU, without a layout change around each); the
        # features change by float rounding only. The speed-up is measured by scripts/main.sh (README).
        self.vae = vae.to(memory_format=torch.channels_last)
        self.unet = unet.to(memory_format=torch.channels_last)
        self.scheduler = scheduler
        steps = int(scheduler.config.num_train_timesteps)
        if not 0 <= t_weak <= t_strong < steps:
            raise ValueError(f"t_weak, t_strong: expected 0 <= t_weak <= t_strong < {steps} (the scheduler's "
                             f"num_train_timesteps), got {t_weak}, {t_strong}")
        self.t_weak, self.t_strong = int(t_weak), int(t_strong)
        if len(pixel_mean) != 3 or len(pixel_std) != 3 or min(pixel_std) <= 0:
            raise ValueError(f"pixel_mean, pixel_std: expected 3 numbers each (std positive), got {list(pixel_mean)}, "
                             f"{list(pixel_std)}")
        context_dim = unet.config.cross_attention_dim
        if empty_prompt.dim() != 3 or empty_prompt.shape[0] != 1 or empty_prompt.shape[-1] != context_dim:
            raise ValueError(f"empty_prompt: expected shape (1, T, {context_dim}) (the UNet's cross_attention_dim), "
                             f"got {tuple(empty_prompt.shape)}")
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("empty_prompt", empty_prompt.detach().clone(), persistent=False)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.share_noise = bool(share_noise)
        self.seed = int(seed)
        self._seeds = random.Random(self.seed)
        self.noise_draws = 0
        self._captured: list[Tensor | None] | None = None
        self._feature_convs = self._find_feature_convs(unet)
        # Each hook fills its own map's slot, so the order of the maps is FEATURE_BLOCKS' whatever order the
        # UNet runs its blocks in; close() removes them.
        self._hooks = [conv.register_forward_hook(functools.partial(self._capture, k))
                       for k, conv in enumerate(self._feature_convs)]
        self.requires_grad_(False)
        super().train(False)

    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, path: str | os.PathLike[str], *, pixel_mean: Sequence[float], pixel_std: Sequence[float],
                    device: torch.device | str | None = None, dtype: torch.dtype | None = None, t_weak: int = 0,
                    t_strong: int = 100, seed: int = 2024, share_noise: bool = False) -> "DiffusionTeacher":
        """Load a local diffusers folder (vae/, unet/, scheduler/, and text_encoder/ + tokenizer/ or
        ``empty_prompt.safetensors``). Never contacts a model hub."""
        root = Path(path).expanduser()
        problem = diffusers_folder_problem(root)
        if problem is not None:
            raise ValueError(f"teacher folder '{root}' is not a usable diffusers folder: {problem}")
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        # low_cpu_mem_usage needs `accelerate`; without it, asking for the plain path keeps diffusers quiet.
        kwargs: dict[str, Any] = {"local_files_only": True,
                                  "low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None}
        if dtype is not None:
            kwargs["torch_dtype"] = dtype
        vae = _load_model("vae", root, AutoencoderKL, **kwargs)
        unet = _load_model("unet", root, UNet2DConditionModel, **kwargs)
        # Only the noise schedule ᾱ_t is used (add_noise); no sampler step is ever taken (METHOD §10.10), so
        # the folder's own scheduler class and prediction type do not matter.
        config = _load("scheduler/", root, lambda: DDPMScheduler.load_config(root, subfolder="scheduler",
                                                                            local_files_only=True))
        scheduler = DDPMScheduler.from_config(config)
        empty_prompt = _empty_prompt_embedding(root, device)
        teacher = cls(vae, unet, scheduler, empty_prompt.to(dtype or torch.float32), pixel_mean=pixel_mean,
                      pixel_std=pixel_std, t_weak=t_weak, t_strong=t_strong, seed=seed, share_noise=share_noise)
        return teacher.to(device) if device is not None else teacher

    @staticmethod
    def _find_feature_convs(unet: nn.Module) -> list[nn.Conv2d]:
        up_blocks = getattr(unet, "up_blocks", None)
        if up_blocks is None or len(up_blocks) < 4:
            count = 0 if up_blocks is None else len(up_blocks)
            raise ValueError(f"unet: expected at least 4 up blocks (features come from up_blocks[1..3]), got {count}")
        convs = []
        for i, j in FEATURE_BLOCKS:
            resnets = getattr(up_blocks[i], "resnets", [])
            if len(resnets) <= j or not isinstance(getattr(resnets[j], "conv2", None), nn.Conv2d):
                raise ValueError(f"unet: up_blocks[{i}] has {len(resnets)} ResNet blocks with a conv2, expected at "
                                 f"least 3 (layers_per_block >= 2)")
            convs.append(resnets[j].conv2)
        return convs

    def _capture(self, index: int, module: nn.Module, inputs: Any, output: Tensor) -> None:
        # conv2's output is the residual branch of ResnetBlock2D, taken before the shortcut is added and the sum
        # divided by output_scale_factor (Hyperfeatures' choice, METHOD §4.3).
        if self._captured is not None:
            if self._captured[index] is not None:
                raise RuntimeError(f"unet: up_blocks{FEATURE_BLOCKS[index]} conv2 ran twice in one forward pass")
            self._captured[index] = output

    def close(self) -> None:
        """Remove the feature hooks from the UNet (for a UNet that outlives this teacher)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # ----------------------------------------------------------------------------------------------------------
    @property
    def channels(self) -> list[int]:
        """Channel counts C_k of the 9 maps, in the order ``forward`` returns them."""
        return [conv.out_channels for conv in self._feature_convs]

    def alphas_cumprod(self, t: int) -> float:
        """ᾱ_t of the folder's noise schedule."""
        return float(self.scheduler.alphas_cumprod[int(t)])

    def train(self, mode: bool = True) -> "DiffusionTeacher":
        """The teacher stays in eval mode whatever the caller asks (it is frozen; METHOD §4.1)."""
        return super().train(False)

    def reset_noise(self, seed: int | None = None) -> None:
        """Restart the noise seed sequence (from ``seed``, or from the constructor's seed)."""
        self.seed = self.seed if seed is None else int(seed)
        self._seeds = random.Random(self.seed)
        self.noise_draws = 0

    def _check_images(self, images: Tensor) -> None:
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images: expected a (B, 3, H, W) ImageNet-normalised tensor, got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"images: expected a float tensor, got dtype {images.dtype}")

    def encode(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) ImageNet-normalised → z0 (B, 4, H/f, W/f), the scaled VAE posterior mean."""
        self._check_images(images)
        rgb = images.float() * self.pixel_std + self.pixel_mean  # back to 0–255: the VAE was trained on [-1, 1]
        x = (rgb / 127.5 - 1.0).to(self.vae.dtype)
        return self.vae.encode(x).latent_dist.mean.float() * self.scaling_factor

    def _noise(self, like: Tensor) -> Tensor:
        # One generator per draw, seeded from a deterministic sequence (Marigold's scheme, METHOD §4.2): the noise
        # depends only on the seed and the number of draws, not on any other use of the global RNG.
        seed = self._seeds.randint(0, 2**63 - 1)
        self.noise_draws += 1
        generator = torch.Generator(device=like.device).manual_seed(seed)
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=torch.float32)

    def noised_latents(self, z0: Tensor) -> tuple[Tensor, Tensor]:
        """z0 (B, 4, h, w) → (z_weak, z_strong), each (B, 4, h, w) in fp32, with fresh noise for each level
        (one noise shared by both when ``share_noise``)."""
        z0 = z0.float()
        noise_weak = self._noise(z0)
        noise_strong = noise_weak if self.share_noise else self._noise(z0)
        out = []
        for t, noise in ((self.t_weak, noise_weak), (self.t_strong, noise_strong)):
            steps = torch.full((z0.shape[0],), t, dtype=torch.long, device=z0.device)
            out.append(self.scheduler.add_noise(z0, noise, steps))
        return out[0], out[1]

    def unet_features(self, latents: Tensor, timesteps: Tensor) -> list[Tensor]:
        """latents (B, 4, h, w), timesteps (B,) long → the 9 residual-branch maps, each (B, C_k, h_k, w_k), fp32."""
        if not self._hooks:
            raise RuntimeError("DiffusionTeacher: closed (its feature hooks were removed)")
        context = self.empty_prompt.expand(latents.shape[0], -1, -1)
        self._captured = [None] * NUM_HYPERFEATURE_MAPS
        try:
            self.unet(latents.to(self.unet.dtype), timesteps, encoder_hidden_states=context.to(self.unet.dtype),
                      return_dict=False)
            maps = self._captured
        finally:
            self._captured = None
        missing = [FEATURE_BLOCKS[k] for k, m in enumerate(maps) if m is None]
        if missing:
            raise RuntimeError(f"unet: no feature map from up_blocks/resnets {missing} (their conv2 did not run)")
        return [m.float() for m in maps]

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """images (B, 3, H, W), ImageNet-normalised → (weak_maps, strong_maps), each 9 tensors (B, C_k, h_k, w_k).

        Weak is t = t_weak, strong t = t_strong (METHOD §4.2). On CUDA the VAE and UNet run under bf16 autocast;
        elsewhere in their own dtype, whatever autocast the caller runs under (a CPU run with train.amp=bf16 keeps
        an fp32 teacher fp32).
        """
        self._check_images(images)
        b = images.shape[0]
        cuda = images.device.type == "cuda"
        with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=cuda):
            z0 = self.encode(images)
            z_weak, z_strong = self.noised_latents(z0)
            # Both noise levels in one UNet pass of 2B samples: every UNet layer is per-sample, so this equals
            # two calls and halves the launch overhead.
            steps = torch.tensor([self.t_weak] * b + [self.t_strong] * b, dtype=torch.long, device=images.device)
            maps = self.unet_features(torch.cat([z_weak, z_strong]), steps)
        return [m[:b] for m in maps], [m[b:] for m in maps]


class QueryDiffGuidance(nn.Module):
    """Teacher + aggregator + losses: agent queries in, weighted ``loss_dist`` and ``loss_sup`` out (METHOD §4).

    The frozen teacher is held outside the module tree, so ``parameters()``, ``state_dict()`` and DDP see only
    the trainable aggregator and loss projections; ``.to()``/``.cuda()``/``.half()`` still move it along.
    """

    def __init__(self, teacher: DiffusionTeacher, aggregator: HyperfeatureAggregator, loss: GuidanceLoss, *,
                 lambda_dist: float = 1.0, lambda_sup: float = 1.0) -> None:
        super().__init__()
        if aggregator.channels != teacher.channels:
            raise ValueError(f"aggregator: expected channels {teacher.channels} (the teacher's maps), got "
                             f"{aggregator.channels}")
        if aggregator.out_dim != loss.dim:
            raise ValueError(f"loss: expected dim {aggregator.out_dim} (the aggregator's out_dim), got {loss.dim}")
        self._teacher = (teacher,)  # a tuple is not registered as a submodule
        self.aggregator = aggregator
        self.loss = loss
        self.lambda_dist = float(lambda_dist)
        self.lambda_sup = float(lambda_sup)

    @property
    def teacher(self) -> DiffusionTeacher:
        return self._teacher[0]

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "QueryDiffGuidance":
        super()._apply(fn, recurse)
        self.teacher._apply(fn, recurse)
        return self

    def forward(self, images_norm: Tensor, agent_queries: Tensor) -> dict[str, Tensor]:
        """images_norm (B, 3, H, W) ImageNet-normalised, agent_queries Q (B, N, D) →
        {"loss_dist": λ_dist·L_dist, "loss_sup": λ_sup·L_sup}, fp32 scalars."""
        if agent_queries.dim() != 3 or agent_queries.shape[-1] != self.loss.dim:
            raise ValueError(f"agent_queries: expected shape (B, N, {self.loss.dim}), got "
                             f"{tuple(agent_queries.shape)}")
        if images_norm.dim() != 4 or images_norm.shape[0] != agent_queries.shape[0]:
            raise ValueError(f"images_norm: expected shape ({agent_queries.shape[0]}, 3, H, W) (one image per row "
                             f"of agent_queries), got {tuple(images_norm.shape)}")
        weak_maps, strong_maps = self.teacher(images_norm)
        # The teacher returns fp32; after .half() / .bfloat16() the aggregator's weights are not.
        dtype = self.aggregator.mixing_logits.dtype
        weak_maps, strong_maps = [m.to(dtype) for m in weak_maps], [m.to(dtype) for m in strong_maps]
        weak = self.aggregator(weak_maps)
        # F_s is only a stop-gradient target of L_dist, so building its graph would be wasted memory; the
        # aggregator has no running statistics, so this gives the same values.
        with torch.no_grad():
            strong = self.aggregator(strong_maps)
        losses = self.loss(agent_queries, weak, strong)
        return {"loss_dist": self.lambda_dist * losses["loss_dist"],
                "loss_sup": self.lambda_sup * losses["loss_sup"]}


def build_guidance(cfg: Config, device: torch.device | str = "cpu") -> QueryDiffGuidance | None:
    """The guidance module of ``cfg.teacher`` on ``device``, or None when ``teacher.enabled`` is false.

    Raises ConfigError naming ``teacher.path`` when it is empty or not a usable diffusers folder.
    """
    t = cfg.teacher
    if not t.enabled:
        return None
    if not t.path:
        raise ConfigError("config key 'teacher.path' is empty: expected a local diffusers folder (Stable Diffusion "
                          "2 / 2.1-base, or a tiny teacher made by `python -m train teacher`), or set "
                          "teacher.enabled=false")
    problem = diffusers_folder_problem(t.path)
    if problem is not None:
        raise ConfigError(f"config key 'teacher.path' = '{t.path}': {problem}")
    try:
        teacher = DiffusionTeacher.from_folder(t.path, pixel_mean=cfg.model.pixel_mean, pixel_std=cfg.model.pixel_std,
                                               device=device, t_weak=t.t_weak, t_strong=t.t_strong, seed=t.seed,
                                               share_noise=t.share_noise)
    except ValueError as err:
        raise ConfigError(f"config key 'teacher.path' = '{t.path}': {err}") from None
    dim = cfg.model.backbone.embed_dim
    aggregator = HyperfeatureAggregator(teacher.channels, dim, t.feature_size, t.bottleneck_dim)
    guidance = QueryDiffGuidance(teacher, aggregator, GuidanceLoss(dim), lambda_dist=t.lambda_dist,
                                 lambda_sup=t.lambda_sup)
    return guidance.to(device)
