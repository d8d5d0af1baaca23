"""A tiny diffusion teacher trained on the synthetic source scenes, for the CPU default run (DESIGN §6, §7).

    python -m train teacher [--out DIR] [--data DIR] [--steps N] [--seed S] [--overwrite]

Stable Diffusion 2 cannot be downloaded here, so the embedded default needs a stand-in with the same structure:
a small AutoencoderKL (reconstruction + a small KL term) and then a small UNet2DConditionModel trained as a DDPM
(ε-prediction on SD's scaled-linear schedule, 1000 steps) on its latents, conditioned on a fixed random
"empty prompt" context. The UNet has SD's four up blocks of three ResNets, so ``qd_core.teacher`` reads the
same nine maps from it as from SD 2. The folder is a diffusers folder (vae/, unet/, scheduler/,
empty_prompt.safetensors) plus teacher.json and README.txt recording how it was made.

It is a pipeline check, not a substitute for Stable Diffusion: its features know only the synthetic scenes.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from qd_core.data.files import write_dir

DEFAULT_OUT = Path("data/teacher-tiny")
DEFAULT_DATA = Path("data/synthetic")
DEFAULT_STEPS = 450  # DDPM steps (the loss plateaus after ~300)
DEFAULT_IMAGE_SIZE = 64
DEFAULT_BATCH_SIZE = 16
# Layers of 32-64 channels on 16x16 latents gain little from a second intra-op thread, and on a shared 2-core
# machine spinning threads made a run 3x more CPU-hungry (measured): train single-threaded by default.
DEFAULT_THREADS = 1
CONTEXT_TOKENS = 2  # BOS, EOS: the length of SD's unpadded empty prompt
CONTEXT_DIM = 32
INFO_FILE = "teacher.json"
# SD's noise schedule (METHOD §4.2): the hyperfeatures are read at t = 0 and t = 100 of this schedule.
SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "prediction_type": "epsilon", "clip_sample": False}


def tiny_vae(image_size: int) -> Any:
    """AutoencoderKL with 4 latent channels, downsampling ×4 (three encoder levels of 32/64/64 channels)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), layers_per_block=1,
                         latent_channels=4, norm_num_groups=16, sample_size=image_size)


def tiny_unet(latent_size: int) -> Any:
    """UNet2DConditionModel shaped like SD's (4 levels, layers_per_block=2 → 3 ResNets per up block) but 32/32/64/64
    wide, with cross-attention only at the second-lowest level and in the middle block: on a CPU the attention
    layers cost more than all the ResNets, and one level is enough for the context to matter."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=(32, 32, 64, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=CONTEXT_DIM, attention_head_dim=4, norm_num_groups=8)


def sd_scheduler() -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULE)


def load_tiles(data_root: Path, image_size: int) -> Tensor:
    """The synthetic source train images as square tiles (T, 3, s, s) in [-1, 1]: each image is resized to a short
    side of s and cut into tiles that cover its long side (two per image for the 1:2 synthetic scenes)."""
    from qd_core.data import cityscapes_dataset

    dataset = cityscapes_dataset(data_root / "source", split="train")
    tiles = []
    for i in range(len(dataset)):
        image = Image.fromarray(dataset[i]["image"])
        w, h = image.size
        scale = image_size / min(w, h)
        w, h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        array = np.asarray(image.resize((w, h), Image.BICUBIC), dtype=np.float32)
        count_x, count_y = math.ceil(w / image_size), math.ceil(h / image_size)
        for y in np.linspace(0, h - image_size, count_y).round().astype(int):
            for x in np.linspace(0, w - image_size, count_x).round().astype(int):
                tiles.append(array[y:y + image_size, x:x + image_size])
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2) / 127.5 - 1.0


def _batch(data: Tensor, size: int, crop: int, generator: torch.Generator) -> Tensor:
    """data (T, C, s, s) → a random batch (size, C, crop, crop): random rows, one random crop, random h-flips."""
    index = torch.randint(len(data), (size,), generator=generator)
    top, left = (torch.randint(data.shape[-1] - crop + 1, (2,), generator=generator).tolist()
                 if crop < data.shape[-1] else (0, 0))
    batch = data[index, :, top:top + crop, left:left + crop]
    flip = torch.rand(size, generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)


def train_vae(vae: Any, tiles: Tensor, steps: int, generator: torch.Generator, *, batch_size: int, progress: bool,
              kl_weight: float = 1e-4) -> list[float]:
    """tiles (T, 3, s, s) in [-1, 1]. Reconstruction (MSE) + kl_weight·KL per latent element, on half-size crops
    (the VAE is convolutional, so small crops train it as well at a quarter of the cost). Returns the
    reconstruction loss of every step."""
    crop = max(16, tiles.shape[-1] // 2)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    bar = tqdm(range(steps), desc="tiny teacher: VAE", disable=not progress, leave=False)
    vae.train()
    for _ in bar:
        x = _batch(tiles, batch_size, crop, generator)
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        rec = F.mse_loss(reconstruction, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        optimizer.zero_grad(set_to_none=True)
        (rec + kl_weight * kl).backward()
        optimizer.step()
        losses.append(rec.item())
        bar.set_postfix(rec=f"{rec.item():.4f}")
    vae.eval()
    return losses


@torch.no_grad()
def encode_tiles(vae: Any, tiles: Tensor, batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """tiles (T, 3, s, s) in [-1, 1] → posterior mean and std, each (T, 4, s/4, s/4)."""
    means, stds = [], []
    for chunk in tiles.split(batch_size):
        posterior = vae.encode(chunk).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(unet: Any, scheduler: Any, latents: tuple[Tensor, Tensor], context: Tensor, steps: int,
               generator: torch.Generator, *, batch_size: int, progress: bool) -> list[float]:
    """DDPM training with ε-prediction: t uniform in [0, 1000), loss ‖ε − ε_θ(z_t, t, c)‖². ``latents`` are the
    scaled posterior (mean, std), each (T, 4, h, w), and a fresh latent sample is drawn each step as SD's training
    does; context c (1, T_c, C) is the fixed empty-prompt stand-in. Returns the loss of every step."""
    mean, std = latents
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    stacked = torch.cat([mean, std], dim=1)
    losses = []
    bar = tqdm(range(steps), desc="tiny teacher: DDPM", disable=not progress, leave=False)
    unet.train()
    for _ in bar:
        m, s = _batch(stacked, batch_size, stacked.shape[-1], generator).chunk(2, dim=1)
        z0 = m + s * torch.randn(m.shape, generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        prediction = unet(scheduler.add_noise(z0, noise, t), t, encoder_hidden_states=context.expand(batch_size, -1, -1)
                          ).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
    unet.eval()
    return losses


def _window_mean(values: Sequence[float], first: bool) -> float:
    n = max(1, len(values) // 10)
    part = values[:n] if first else values[-n:]
    return float(sum(part) / len(part))


def _curve(values: Sequence[float], points: int = 20) -> list[list[float]]:
    """(step, mean loss of the window ending there) at ~``points`` evenly spaced steps."""
    size = max(1, len(values) // points)
    return [[min(i + size, len(values)), round(float(np.mean(values[i:i + size])), 5)]
            for i in range(0, len(values), size)]


def is_tiny_teacher(folder: Path) -> bool:
    """True when ``folder`` is a complete teacher written by ``make_tiny_teacher``."""
    from qd_core.teacher import diffusers_folder_problem

    return (folder / INFO_FILE).is_file() and diffusers_folder_problem(folder) is None


def make_tiny_teacher(out: Path, data_root: Path, *, seed: int = 0, steps: int = DEFAULT_STEPS,
                      vae_steps: int | None = None, image_size: int = DEFAULT_IMAGE_SIZE,
                      batch_size: int = DEFAULT_BATCH_SIZE, threads: int | None = DEFAULT_THREADS,
                      overwrite: bool = False, progress: bool = True) -> Path:
    """Train the tiny teacher on ``data_root/source`` (generated with the default synthetic settings if absent)
    and write it to ``out`` atomically; returns ``out``.

    ``steps`` DDPM steps follow ``vae_steps`` VAE steps (default: steps // 3). ``threads`` is torch's intra-op
    thread count while training (restored afterwards; None keeps the current one). ``out`` is replaced only
    with ``overwrite=True``, and only once the new folder is complete.
    """
    out, data_root = Path(out), Path(data_root)
    vae_steps = max(1, steps // 3) if vae_steps is None else vae_steps
    for name, value in (("steps", steps), ("vae_steps", vae_steps), ("batch_size", batch_size),
                        ("threads", 1 if threads is None else threads)):
        if value <= 0:
            raise ValueError(f"{name}: expected a positive integer, got {value}")
    if not 32 <= image_size <= 512 or image_size % 16:
        raise ValueError(f"image_size: expected a multiple of 16 in [32, 512], got {image_size}")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out}: already exists; pass --overwrite (overwrite=True) to replace it")
    if not (data_root / "source").is_dir():
        from qd_core.data import ensure_synthetic

        ensure_synthetic(data_root, progress=progress)

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or previous_threads)
    try:
        return _make(out, data_root, seed=seed, steps=steps, vae_steps=vae_steps, image_size=image_size,
                     batch_size=batch_size, progress=progress)
    finally:
        torch.set_num_threads(previous_threads)


def _make(out: Path, data_root: Path, *, seed: int, steps: int, vae_steps: int, image_size: int, batch_size: int,
          progress: bool) -> Path:
    from qd_core.data import data_identity

    start = time.perf_counter()
    tiles = load_tiles(data_root, image_size)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # model init uses the global RNG; leave the caller's stream alone
        torch.manual_seed(seed)
        vae, unet, scheduler = tiny_vae(image_size), tiny_unet(image_size // 4), sd_scheduler()
        context = torch.randn(1, CONTEXT_TOKENS, CONTEXT_DIM, generator=generator)
    vae_losses = train_vae(vae, tiles, vae_steps, generator, batch_size=batch_size, progress=progress)
    mean, std = encode_tiles(vae, tiles)
    # SD's 0.18215 was chosen so that scaled latents have unit variance; the same rule for this VAE.
    scaling = float(1.0 / mean.std().clamp_min(1e-6))
    vae.register_to_config(scaling_factor=scaling)
    unet_losses = train_unet(unet, scheduler, (mean * scaling, std * scaling), context, steps, generator,
                             batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - start

    info = {
        "made_by": "train.teacher.make_tiny_teacher", "seed": seed, "data_root": str(data_root),
        "data_identity": data_identity(data_root),
        "image_size": image_size, "tiles": len(tiles), "batch_size": batch_size, "vae_steps": vae_steps,
        "ddpm_steps": steps, "latent_downsample": 4, "scaling_factor": scaling, "context_shape": list(context.shape),
        "vae_reconstruction_mse": {"first": _window_mean(vae_losses, True), "last": _window_mean(vae_losses, False)},
        "ddpm_loss": {"first": _window_mean(unet_losses, True), "last": _window_mean(unet_losses, False),
                      "curve": _curve(unet_losses)},
        "seconds": round(seconds, 1), "torch_threads": torch.get_num_threads(),
    }
    write_dir(out, lambda tmp: _write_folder(tmp, vae, unet, scheduler, context, info))
    if progress:
        d = info["ddpm_loss"]
        print(f"tiny teacher: {vae_steps} VAE + {steps} DDPM steps in {seconds:.0f} s; DDPM loss "
              f"{d['first']:.3f} -> {d['last']:.3f}; written to {out}")
    return out


def _write_folder(folder: Path, vae: Any, unet: Any, scheduler: Any, context: Tensor, info: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    vae.save_pretrained(folder / "vae")
    unet.save_pretrained(folder / "unet")
    scheduler.save_pretrained(folder / "scheduler")
    save_file({"embedding": context.contiguous()}, str(folder / "empty_prompt.safetensors"))
    d = info["ddpm_loss"]
    (folder / "README.txt").write_text(
        "Tiny diffusion teacher for the synthetic QueryDiff default run (not Stable Diffusion).\n"
        f"Made by `python -m train teacher` from {info['data_root']}/source (train split), seed {info['seed']}:\n"
        f"  AutoencoderKL (x4 downsampling, 4 latent channels), {info['vae_steps']} steps of MSE + 1e-4 KL on "
        f"{info['image_size'] // 2}px crops,\n"
        f"  scaling_factor {info['scaling_factor']:.5f} (unit-variance latents);\n"
        f"  UNet2DConditionModel (32/32/64/64, 2 layers per block), {info['ddpm_steps']} DDPM steps, eps-prediction,\n"
        f"  scaled-linear betas 0.00085-0.012 over 1000 steps; DDPM loss {d['first']:.4f} -> {d['last']:.4f};\n"
        f"  context: a fixed random (1, {CONTEXT_TOKENS}, {CONTEXT_DIM}) tensor in empty_prompt.safetensors.\n"
        f"Took {info['seconds']} s. Details in {INFO_FILE}.\n")
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def ensure_tiny_teacher(out: Path, data_root: Path, *, seed: int = 0, steps: int = DEFAULT_STEPS,
                        vae_steps: int | None = None, image_size: int = DEFAULT_IMAGE_SIZE,
                        threads: int | None = DEFAULT_THREADS, overwrite: bool = False, progress: bool = True) -> Path:
    """``out`` holding a tiny teacher: reused when a complete one made from scenes like ``data_root``'s is there
    (whatever other settings made it), made otherwise, replacing one made from other scenes (an older generator
    version or another seed). Call from one process only (rank 0 under DDP, then a barrier)."""
    out = Path(out)
    if not overwrite and is_tiny_teacher(out) and _made_from(out, data_root):
        return out
    return make_tiny_teacher(out, data_root, seed=seed, steps=steps, vae_steps=vae_steps, image_size=image_size,
                             threads=threads, overwrite=overwrite or out.exists(), progress=progress)


def _made_from(folder: Path, data_root: Path) -> bool:
    """Whether the teacher in ``folder`` was trained on scenes with ``data_root``'s identity."""
    try:
        info = json.loads((folder / INFO_FILE).read_text())
    except (OSError, ValueError):
        return False
    from qd_core.data import data_identity

    current = data_identity(data_root)  # None for a folder not made by the generator: then the path decides
    return info.get("data_identity") == current and (current is not None or info.get("data_root") == str(data_root))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train teacher",
        description="Train a tiny diffusion teacher (VAE + DDPM UNet, diffusers format) on the synthetic source "
                    "scenes, on the CPU in a few minutes. Point teacher.path at the folder it writes.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help=f"synthetic data root holding source/ (generated if absent; default: {DEFAULT_DATA})")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"DDPM steps (default: {DEFAULT_STEPS})")
    parser.add_argument("--vae-steps", type=int, default=None, help="VAE steps (default: --steps // 3)")
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE,
                        help=f"side of the square training tiles in pixels (default: {DEFAULT_IMAGE_SIZE})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help=f"torch intra-op threads while training (default: {DEFAULT_THREADS})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        make_tiny_teacher(args.out, args.data, seed=args.seed, steps=args.steps, vae_steps=args.vae_steps,
                          image_size=args.image_size, threads=args.threads, overwrite=args.overwrite,
                          progress=not args.no_progress)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        parser.error(str(err))
    if args.no_progress:
        print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
