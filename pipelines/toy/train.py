"""Train the toy SD3 on the toy world, on the CPU, reproducibly: `python -m pipelines.toy.train OUT`.

Two phases, each a fixed number of steps (never wall time), from fixed seeds, with a fixed thread
count, so that a rerun on the same machine type writes bit-identical weights:

A. the VAE (diffusers `AutoencoderKL`: 8x down-sampling, 16 latent channels, SD3's scaling 1.5305 and
   shift 0.0609), then a **quality gate**: PSNR ≥ 28 dB on held-out renders, and every named colour
   read back as itself (background and shape) by the judge after a round trip. A failed gate stops
   the script (exit status 2) before any transformer step is spent.
B. the transformer (`SD3Transformer2DModel` at SD3's width rule: hidden = 64 × blocks, heads of 64,
   patch 2, 16 channels) with SD3's rectified-flow objective: x_t = (1 − σ)·x0 + σ·ε, target
   v = ε − x0, σ logit-normal then time-shifted as the serving schedules are (shift 3), timestep
   1000·σ as `pipelines.sd3` feeds it, x0 = (VAE mean − shift) · scaling. Captions are dropped to
   the empty prompt and to all-zero conditioning (our CFG uses both), and their conditioning is
   computed once, for the whole finite caption set, by the serving code's own encoder
   (`pipelines.text.encode_prompt`) on the tiny model's random, frozen text encoders.
   Phases run at growing image sizes: most steps small, the last at 512 px.

The output is an ordinary diffusers folder (safetensors; transformer and VAE in fp16 when that
changes their output by less than a stated bound, text encoders always fp32 so that serving
encodes exactly what training saw) plus `toy-manifest.json`: script version, configuration, seeds,
steps, gate figures, and the sha256 of every file.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.toy import judge, world

SCRIPT_VERSION = "4"
MANIFEST = "toy-manifest.json"
SCALING_FACTOR = 1.5305  # SD3's: ComfyUI hard-codes these for every SD3 model
SHIFT_FACTOR = 0.0609
FLOW_SHIFT = 3.0  # the API's default `shift`: training sees the σ the sampler spends its steps on
EMPTY = ""


@dataclass(frozen=True, kw_only=True)
class Phase:
    size: int  # image side in pixels
    steps: int
    batch: int
    # Scenes rendered and VAE-encoded once at the phase's start, then drawn at random: encoding is as
    # costly as a training step at 128 px and several times one at 512 px, and a pool of a few
    # thousand layouts per size covers a world of 1680 captions.
    pool: int
    # Runs alternately with the phase before it (their steps spread evenly over each other) instead of
    # after it, so that a run keeps seeing one size while it learns another (runs 7 and 8 tried it
    # against the colours lost at 512 px; docs/toy.md §11 says what it did and did not do).
    interleave: bool = False
    # The time shift of the phase's training σ. It only moves where the training effort goes, never
    # what is learnt (the target at each σ is the same), so serving still samples at its own shift.
    # A larger image says more about its layout at the same σ (more pixels average out the noise),
    # so its shape and place are decided at a higher σ than a small image's (docs/toy.md §12):
    # SD3's resolution-dependent shift, here as a training-time weighting.
    shift: float = FLOW_SHIFT

    @classmethod
    def parse(cls, text: str) -> Phase:
        """ "SIZE:STEPS:BATCH[:POOL][@SHIFT]", e.g. "128:4000:16:8192" or "512:900:4@6"; the pool
        defaults to a quarter of the samples the phase draws (each scene seen about four times), the
        shift to FLOW_SHIFT. A leading "+" interleaves the phase with the one before it."""
        interleave = text.startswith("+")
        body, at, shift_text = text.removeprefix("+").partition("@")
        try:
            parts = [int(part) for part in body.split(":")]
            shift = float(shift_text) if at else FLOW_SHIFT
            if len(parts) not in (3, 4):
                raise ValueError
        except ValueError:
            raise ValueError(f"phase {text!r} is not SIZE:STEPS:BATCH[:POOL][@SHIFT]") from None
        size, steps, batch = parts[:3]
        if size % 16:
            raise ValueError(f"phase size {size} is not a multiple of 16 (8x VAE, 2x2 patches)")
        if not (shift > 0 and math.isfinite(shift)):
            raise ValueError(f"phase {text!r}: the shift must be a positive number")
        pool = parts[3] if len(parts) == 4 else max(batch, steps * batch // 4)
        return cls(size=size, steps=steps, batch=batch, pool=pool, interleave=interleave, shift=shift)


def stages(phases: Sequence[Phase]) -> list[list[Phase]]:
    """The phases grouped into what runs one after another: each group's phases run interleaved."""
    if phases and phases[0].interleave:
        raise ValueError("the first phase has nothing before it to interleave with")
    groups: list[list[Phase]] = []
    for phase in phases:
        if phase.interleave:
            groups[-1].append(phase)
        else:
            groups.append([phase])
    return groups


def interleaving(group: Sequence[Phase]) -> list[int]:
    """Which of the group's phases each step trains: at every step the one furthest behind its share
    (ties to the earlier phase), so that each is spread evenly over the whole stretch."""
    done = [0] * len(group)
    order = []
    for _ in range(sum(p.steps for p in group)):
        i = min(
            (i for i, p in enumerate(group) if done[i] < p.steps), key=lambda i: (done[i] / group[i].steps, i)
        )
        done[i] += 1
        order.append(i)
    return order


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    seed: int = 0
    threads: int = 2
    # Phase A: the VAE.
    # Batches of 16 for 6000 steps at 3e-4: 33.4 dB, every colour pair right. Batches of 8 sat at the
    # gate's edge: 6000 steps gave 32.0 dB with red on green read as orange, 8000 steps 33.0 dB with
    # blue on orange read as purple, 10000 steps 33.4 dB and all right (2000 steps: 27.0 dB, 7 wrong).
    vae_steps: int = 6000
    vae_size: int = 32  # crops of renders at 1x, 2x, 4x this size
    vae_batch: int = 16
    vae_lr: float = 3e-4  # 1e-3 stalled (loss 0.3–0.5 at 600 steps); 3e-4 gave 20.6 dB at 400, 1e-4 16.7 dB
    vae_channels: tuple[int, ...] = (16, 32, 64, 64)  # four blocks = three 2x steps = 8x
    vae_kl_weight: float = 1e-6
    # One normalization group: GroupNorm removes each group's mean and scale per image, and on a flat
    # image a group of k constant channels keeps only k − 2 numbers. With tiny's 8 groups over the
    # decoder's last 16 channels that is nothing but a sign per group, so flat colours can only come out
    # as a few discrete ones (black turns navy); one group keeps 14 of 16 (likewise in the encoder).
    vae_norm_groups: int = 1
    psnr_gate: float = 28.0
    enforce_gate: bool = True  # False only for smoke tests of the script: the manifest says so
    # Phase B: the transformer.
    depth: int = 3  # blocks; hidden size 64·depth, depth heads of 64 (SD3's width rule)
    phases: tuple[Phase, ...] = field(
        default_factory=lambda: (
            Phase(size=128, steps=6000, batch=16, pool=16384),
            Phase(size=256, steps=1500, batch=8, pool=4096),
            Phase(size=512, steps=600, batch=4, pool=1024),
        )
    )
    lr: float = 5e-4
    warmup: int = 200
    # The loss inside the shape (dilated by one latent pixel) weighs 1 + shape_weight times the
    # background's: a shape covers 3-8 % of a scene, so with plain MSE the flat background dominates
    # the gradient, and the shape's kind (decided by a few edge pixels) is the last thing learned.
    shape_weight: float = 0.0
    # The loss within one latent pixel of the shape's outline weighs edge_weight more again: the kind
    # (square, circle, triangle) is decided by those pixels alone, a ring round the shape's edge.
    edge_weight: float = 0.0
    # Phase B may start from an earlier toy folder's transformer and VAE (phase A is then skipped, its
    # gate re-measured): a fine-tune is the earlier run's command plus this one's.
    init: str | None = None
    # bf16 autocast of the transformer's forward (weights, optimizer, EMA and loss stay fp32): 1.6-1.8x
    # faster per step on a CPU with native bf16 (AVX512-BF16/AMX; benchmarks/toy_train_step.py), and still
    # deterministic there. Off where the CPU lacks it: emulated bf16 is slower than fp32.
    autocast_bf16: bool = False
    ema: float = 0.999
    drop_empty: float = 0.1  # share of captions replaced by the empty prompt's conditioning
    drop_zero: float = 0.1  # ... and by all-zero conditioning (ComfyUI's ConditioningZeroOut)
    # Share of the captions kept whole that are replaced by one of `world.partial_texts` (drawn
    # uniformly), so that a bare "red" in a negative prompt means a red shape to the model.
    partial: float = 0.0
    # Share of the captions kept whole whose pooled vector alone becomes the empty prompt's. The pooled
    # CLIP vector sees the whole caption, and a model that reads the colours from it alone ignores a
    # `(red:1.5)` weight, which moves only the word's own context tokens: this makes the tokens count.
    drop_pooled: float = 0.0
    # Where the transformer's scenes put a shape whose caption names no place (`world.UNPOSITIONED`).
    unpositioned: str = "anywhere"
    # Share of the transformer's scenes whose caption names no position (None: as in the caption set,
    # a tenth). Those are the captions the model draws worst: it must choose a place itself.
    unpositioned_share: float | None = None
    # How much larger than a positioned shape an unpositioned one is drawn (its half-size, 1: the same).
    # A larger shape spans more latent cells, so its kind is legible in more of them (docs/toy.md §29).
    unpositioned_scale: float = 1.0
    # The text encoders stay random and frozen, but may be given two habits of trained ones: each word
    # of the world's captions one token (`words`), and residual branches scaled down so that a word's
    # encoding stays mostly at its own position (`text_residual_scale`; pipelines.tiny). A `(red:1.5)`
    # weight moves only the word's own positions, so it can only steer a model that reads it there.
    words: bool = False
    text_residual_scale: float = 1.0
    # Progress is measured every `eval_every` steps (and at each phase's end) by generating
    # `eval_prompts` captions at the phase's size through the serving generator with the EMA weights
    # and reading them with the judge; it draws from its own seeds, so it never changes the weights.
    eval_every: int = 1000
    eval_prompts: int = 24
    # fp16 storage is kept only when it moves outputs by less than this (relative RMS).
    fp16_tolerance: float = 1e-3


class GateFailed(Exception):
    """The VAE missed its quality gate: the transformer must not be trained on its latents."""


Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- data ------------------------------------------------------------------------------------------
def scene_batch(
    rng: np.random.Generator,
    *,
    size: int,
    batch: int,
    unpositioned: str = "anywhere",
    unpositioned_share: float | None = None,
    unpositioned_scale: float = 1.0,
) -> tuple[list[world.Scene], torch.Tensor]:
    """`batch` random scenes and their renders as a [B, 3, size, size] tensor in [−1, 1]."""
    scenes = [
        world.random_scene(
            rng,
            unpositioned=unpositioned,
            unpositioned_share=unpositioned_share,
            unpositioned_scale=unpositioned_scale,
        )
        for _ in range(batch)
    ]
    return scenes, to_tensor([world.render(s, size) for s in scenes])


def crop_batch(rng: np.random.Generator, *, size: int, batch: int) -> torch.Tensor:
    """Random `size`-px crops of scenes rendered at 1x, 2x or 4x `size`: the VAE is convolutional and
    sees only local patches, so crops of larger renders teach it the long straight edges and wide
    flat areas of large images at the cost of small ones."""
    images = []
    for _ in range(batch):
        side = size * int(rng.choice([1, 2, 4]))
        image = world.render(world.random_scene(rng), side)
        top, left = (int(v) for v in rng.integers(0, side - size + 1, size=2))
        images.append(image[top : top + size, left : left + size])
    return to_tensor(images)


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    array = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [−1, 1] → [B, H, W, 3] uint8, as the serving decode rounds (`pipelines.sd3`)."""
    scaled = (255.0 * ((pixels.float() + 1.0) / 2.0).clamp(0.0, 1.0)).to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).numpy()


# -- models ----------------------------------------------------------------------------------------
def build_vae(cfg: TrainConfig) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(cfg.seed + 100)
    channels = cfg.vae_channels
    vae: Any = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=cfg.vae_norm_groups,
        sample_size=1024,
        scaling_factor=SCALING_FACTOR,
        shift_factor=SHIFT_FACTOR,
        use_quant_conv=False,
        use_post_quant_conv=False,
        # No attention in the middle block: a purely convolutional VAE treats every image size alike,
        # so one trained on small crops of a scale-free world decodes 1024 px the same way.
        mid_block_add_attention=False,
    )
    # Start the posterior narrow (std e^-3 ≈ 0.05 of a latent unit, log-variance −6): from the default
    # std of 1 the sampled latent hides the mean until the log-variance has been learned down, which
    # costs hundreds of CPU steps for nothing (the KL weight is tiny, so it would end near here anyway).
    with torch.no_grad():
        vae.encoder.conv_out.bias[16:].fill_(-6.0)
    return vae


def build_transformer(cfg: TrainConfig, *, joint_attention_dim: int, pooled_dim: int) -> Any:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(cfg.seed + 200)
    hidden = 64 * cfg.depth  # SD3's rule, which ComfyUI's model detection reads the depth from
    return SD3Transformer2DModel(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=cfg.depth,
        attention_head_dim=64,
        num_attention_heads=cfg.depth,
        joint_attention_dim=joint_attention_dim,
        caption_projection_dim=hidden,
        pooled_projection_dim=pooled_dim,
        out_channels=16,
        pos_embed_max_size=192,  # SD3 Medium's table, as in pipelines.tiny
    )


def _lr_factor(step: int, *, total: int, warmup: int) -> float:
    """Linear warm-up, then a cosine decay to a tenth: a pure function of the step number."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class _Clock:
    """Wall and CPU (all threads) seconds since creation: on a shared machine the wall clock says how
    busy the neighbours were, the CPU time what the work costs."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def per_step(self, name: str, steps: int) -> dict[str, float]:
        n = max(1, steps)
        return {
            f"{name}_wall_seconds_per_step": round((time.perf_counter() - self.wall) / n, 4),
            f"{name}_cpu_seconds_per_step": round((time.process_time() - self.cpu) / n, 4),
        }


# -- phase A: the VAE ------------------------------------------------------------------------------
def train_vae(cfg: TrainConfig, vae: Any, log: Log) -> dict[str, float]:
    """Train the VAE for `cfg.vae_steps` steps; return the seconds per step."""
    rng = np.random.default_rng([cfg.seed, 1])
    noise = torch.Generator().manual_seed(cfg.seed + 1)
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    clock = _Clock()
    for step in range(cfg.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.vae_lr * _lr_factor(step, total=cfg.vae_steps, warmup=min(100, cfg.vae_steps))
        images = crop_batch(rng, size=cfg.vae_size, batch=cfg.vae_batch)
        posterior = vae.encode(images).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=noise)
        recon = vae.decode(z).sample
        # Latents kept where SD3's fixed scaling/shift expect them: (z − shift)·scaling ~ N(0, 1).
        scaled = (posterior.mean - SHIFT_FACTOR) * SCALING_FACTOR
        moments = scaled.mean() ** 2 + (scaled.std() - 1.0) ** 2
        loss = (
            F.mse_loss(recon, images)
            + 0.1 * F.l1_loss(recon, images)
            + cfg.vae_kl_weight * posterior.kl().mean()
            + 1e-2 * moments
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step}: loss {loss.item():.5f}")
    vae.eval()
    return clock.per_step("vae", cfg.vae_steps)


@torch.no_grad()
def vae_gate(cfg: TrainConfig, vae: Any) -> dict[str, Any]:
    """PSNR over held-out scenes (at the crop size and at 4x it) and each colour pair read as itself."""
    rng = np.random.default_rng([cfg.seed, 2])
    squared, count = 0.0, 0
    for size in (cfg.vae_size, 4 * cfg.vae_size):
        for _ in range(4):
            _, images = scene_batch(rng, size=size, batch=4)
            recon = round_trip(vae, images)
            target = to_uint8(images).astype(np.float64)
            squared += float(((recon.astype(np.float64) - target) ** 2).sum())
            count += target.size
    psnr = 10.0 * math.log10(255.0**2 / max(squared / count, 1e-12))

    wrong = []
    # Colours are checked at 4x the crop size (128 px by default), where a shape spans a few latent
    # cells: at 32 px it is 6 px wide, under one 8x latent cell, and no 8x VAE keeps it whole.
    for caption in world.all_captions():
        if caption.shape == "square" and caption.position == "center":
            image = world.render(world.scene_for(caption, rng), 4 * cfg.vae_size)
            reading = judge.read(round_trip(vae, to_tensor([image]))[0])
            if (reading.background, reading.colour) != (caption.background, caption.colour):
                wrong.append(f"{caption.text} → {reading.colour} on {reading.background}")
    scaled = []
    for _ in range(4):
        _, images = scene_batch(rng, size=cfg.vae_size, batch=8)
        scaled.append((vae.encode(images).latent_dist.mean - SHIFT_FACTOR) * SCALING_FACTOR)
    latents = torch.cat(scaled)
    return {
        "psnr_db": round(psnr, 3),
        "colour_errors": wrong,
        "scaled_latent_mean": round(float(latents.mean()), 4),
        "scaled_latent_std": round(float(latents.std()), 4),
        "passed": psnr >= cfg.psnr_gate and not wrong,
    }


def round_trip(vae: Any, images: torch.Tensor) -> np.ndarray:
    """Encode (the posterior mean) and decode as serving does: uint8 [B, H, W, 3]."""
    latent = (vae.encode(images).latent_dist.mean - SHIFT_FACTOR) * SCALING_FACTOR
    return to_uint8(vae.decode(latent / SCALING_FACTOR + SHIFT_FACTOR).sample)


# -- phase B: the transformer ----------------------------------------------------------------------
class CaptionBank:
    """The conditioning of the captions (by their index in `world.all_captions()`) and of the empty prompt.

    Each text is encoded once, on first use, by the serving code's own encoder, exactly as
    `SD3Generator.encode` calls it; encoding is per prompt, so the result does not depend on the order
    in which captions are first drawn. (Encoding all 1680 up front costs minutes on a busy CPU; a full
    training run draws every caption within its first few hundred steps anyway.)
    """

    def __init__(self, pipe: Any) -> None:
        from pipelines.sd3 import SamplingOptions

        self._pipe = pipe
        self._length = SamplingOptions().max_sequence_length
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.empty_context, self.empty_pooled = (t[0] for t in self._encode(EMPTY))

    @torch.no_grad()
    def _encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        from pipelines.text import encode_prompt

        if text not in self._cache:
            cpu = torch.device("cpu")
            self._cache[text] = encode_prompt(
                self._pipe, text, device=cpu, dtype=torch.float32, t5_min_length=self._length
            )
        return self._cache[text]

    def get(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context [B, L, D], pooled [B, P]) of these prompts."""
        pairs = [self._encode(text) for text in texts]
        return torch.cat([c for c, _ in pairs]), torch.cat([p for _, p in pairs])

    @property
    def widths(self) -> tuple[int, int]:
        """(joint attention width D, pooled width P)."""
        return int(self.empty_context.shape[-1]), int(self.empty_pooled.shape[-1])


def sample_sigmas(gen: torch.Generator, batch: int, shift: float = FLOW_SHIFT) -> torch.Tensor:
    """SD3's logit-normal t (m = 0, s = 1), time-shifted as the serving schedules are."""
    from schedulers.sigmas import time_shift

    t = torch.sigmoid(torch.randn(batch, generator=gen))
    return time_shift(t, shift)


def condition_batch(
    bank: CaptionBank, captions: list[world.Caption], gen: torch.Generator, cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's conditioning with caption dropout: some become the empty prompt, some all zeros, (with
    `cfg.partial`) some a shorter prompt that is still true of the image, and (with `cfg.drop_pooled`)
    some keep their context tokens with the empty prompt's pooled vector."""
    texts = [c.text for c in captions]
    draw = torch.rand(len(captions), generator=gen)
    if cfg.partial:
        # Drawn only when asked for, so that runs without partial prompts keep their random stream.
        shorten = torch.rand(len(captions), generator=gen) < cfg.partial
        choices = len(world.partial_texts(captions[0]))  # the same count for every caption
        pick = torch.randint(0, choices, (len(captions),), generator=gen)
        texts = [
            world.partial_texts(c)[int(i)] if cut else text
            for c, text, cut, i in zip(captions, texts, shorten.tolist(), pick.tolist(), strict=True)
        ]
    context, pooled = bank.get(texts)
    empty = draw < cfg.drop_empty
    zero = (draw >= cfg.drop_empty) & (draw < cfg.drop_empty + cfg.drop_zero)
    context[empty], pooled[empty] = bank.empty_context, bank.empty_pooled
    context[zero], pooled[zero] = 0.0, 0.0
    if cfg.drop_pooled:
        # Drawn only when asked for, as `partial` is, so that earlier runs keep their random stream.
        alone = (torch.rand(len(captions), generator=gen) < cfg.drop_pooled) & ~empty & ~zero
        pooled[alone] = bank.empty_pooled
    return context, pooled


def velocity(
    transformer: Any, x_t: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor
) -> torch.Tensor:
    """The transformer's prediction of ε − x0 at σ, with the timestep scaled as `pipelines.sd3` feeds it."""
    return transformer(
        hidden_states=x_t,
        timestep=1000.0 * sigma,
        encoder_hidden_states=context,
        pooled_projections=pooled,
        return_dict=False,
    )[0]


@torch.no_grad()
def encode_latents(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """x0 as the sampler's latents are: (VAE posterior mean − shift) · scaling."""
    return (vae.encode(images).latent_dist.mean - SHIFT_FACTOR) * SCALING_FACTOR


def shape_masks(scenes: list[world.Scene], *, size: int) -> torch.Tensor:
    """[B, 2, size/8, size/8]: channel 0 is 1 where a latent pixel lies inside the shape or within one
    latent pixel of its edge, channel 1 where it lies within one latent pixel of the edge either side
    (the latent grid is the image's at 1/8, so distances come out in latent pixels)."""
    side = size // 8
    distance = np.stack([world.signed_distance(s, side, side) for s in scenes])
    masks = np.stack([distance < 1.0, np.abs(distance) < 1.0], axis=1)
    return torch.from_numpy(masks.astype(np.float32))


class LatentPool:
    """`count` random scenes of one size, rendered and encoded once: (captions, x0 latents, shape masks)."""

    def __init__(
        self,
        vae: Any,
        rng: np.random.Generator,
        *,
        size: int,
        count: int,
        chunk: int = 16,
        unpositioned: str = "anywhere",
        unpositioned_share: float | None = None,
        unpositioned_scale: float = 1.0,
    ) -> None:
        captions: list[world.Caption] = []
        latents, masks = [], []
        for start in range(0, count, chunk):
            batch = min(chunk, count - start)
            scenes, images = scene_batch(
                rng,
                size=size,
                batch=batch,
                unpositioned=unpositioned,
                unpositioned_share=unpositioned_share,
                unpositioned_scale=unpositioned_scale,
            )
            captions += [s.caption for s in scenes]
            latents.append(encode_latents(vae, images))
            masks.append(shape_masks(scenes, size=size))
        self.captions = captions
        self.latents = torch.cat(latents)
        self.masks = torch.cat(masks)

    def draw(
        self, rng: np.random.Generator, batch: int
    ) -> tuple[list[world.Caption], torch.Tensor, torch.Tensor]:
        index = torch.from_numpy(rng.integers(0, len(self.captions), size=batch))
        return [self.captions[int(i)] for i in index], self.latents[index], self.masks[index]


def flow_loss(
    v: torch.Tensor, target: torch.Tensor, masks: torch.Tensor, shape_weight: float, edge_weight: float = 0.0
) -> torch.Tensor:
    """The rectified-flow MSE, each latent pixel weighted 1 + shape_weight·inside + edge_weight·edge
    (`shape_masks`' two channels; normalised by the weights' mean, so the loss's scale stays that of
    plain MSE; both weights 0 is plain MSE)."""
    if not shape_weight and not edge_weight:
        return F.mse_loss(v.float(), target)
    weight = 1.0 + shape_weight * masks[:, :1]
    if edge_weight:
        weight = weight + edge_weight * masks[:, 1:2]
    return ((v.float() - target).pow(2) * weight).mean() / weight.mean()


def eval_captions(cfg: TrainConfig) -> list[world.Caption]:
    """A fixed sample of the caption set (with and without position words) for progress reports."""
    captions = world.all_captions()
    rng = np.random.default_rng([cfg.seed, 5])
    return [captions[i] for i in rng.choice(len(captions), size=cfg.eval_prompts, replace=False)]


@torch.no_grad()
def adherence(pipe: Any, captions: list[world.Caption], *, size: int, steps: int = 20) -> dict[str, float]:
    """Adherence (`pipelines.toy.quality`) of `pipe`'s images of these captions, seeds 0, 1, …, generated
    by the serving code at the API's other defaults."""
    from pipelines.loading import LoadedModel
    from pipelines.request import GenerationRequest
    from pipelines.sd3 import SD3Generator
    from pipelines.toy import quality

    cpu, fp32 = torch.device("cpu"), torch.float32
    generator = SD3Generator(LoadedModel(pipe=pipe, device=cpu, dtype=fp32, description="toy"))
    base = GenerationRequest(prompt="", width=size, height=size, steps=steps)
    scores = quality.adherence(generator, [(c, i) for i, c in enumerate(captions)], base).as_dict()
    return {k: v for k, v in scores.items() if k != "count" and v == v}  # NaN: no caption named a position


def train_transformer(
    cfg: TrainConfig, transformer: Any, vae: Any, bank: CaptionBank, log: Log, *, pipe: Any = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train for every phase's steps; return the EMA weights and the seconds per step of each phase
    (and, with `pipe`, the progress reports: adherence of the EMA weights along the way)."""
    rng = np.random.default_rng([cfg.seed, 3])
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    total = sum(p.steps for p in cfg.phases)
    timings: dict[str, Any] = {}
    progress: list[dict[str, Any]] = []
    probe = copy.deepcopy(transformer) if pipe is not None else None
    captions = eval_captions(cfg)

    def report(step: int, size: int) -> None:
        if pipe is None or probe is None:
            return
        probe.load_state_dict(ema)
        probe.eval()
        pipe.register_modules(transformer=probe, vae=vae)
        scores = {"step": step, "size": size, **adherence(pipe, captions, size=size)}
        progress.append(scores)
        log(f"adherence: {json.dumps(scores)}")

    step = 0
    for group in stages(cfg.phases):
        pools = []
        for phase in group:
            pool_clock = _Clock()
            pools.append(
                LatentPool(
                    vae,
                    rng,
                    size=phase.size,
                    count=phase.pool,
                    unpositioned=cfg.unpositioned,
                    unpositioned_share=cfg.unpositioned_share,
                    unpositioned_scale=cfg.unpositioned_scale,
                )
            )
            timings.update(pool_clock.per_step(f"pool_{phase.size}px", phase.pool))
        clock = _Clock()
        order = interleaving(group)
        for group_step, which in enumerate(order):
            phase, pool = group[which], pools[which]
            for param_group in optimizer.param_groups:
                param_group["lr"] = cfg.lr * _lr_factor(step, total=total, warmup=min(cfg.warmup, total))
            batch_captions, x0, masks = pool.draw(rng, phase.batch)
            context, pooled = condition_batch(bank, batch_captions, gen, cfg)
            sigma = sample_sigmas(gen, phase.batch, phase.shift)
            eps = torch.randn(x0.shape, generator=gen)
            s = sigma.view(-1, 1, 1, 1)
            x_t = (1.0 - s) * x0 + s * eps
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.autocast_bf16):
                v = velocity(transformer, x_t, sigma, context, pooled)
            loss = flow_loss(v, eps - x0, masks, cfg.shape_weight, cfg.edge_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            decay = min(cfg.ema, (1.0 + step) / (10.0 + step))
            with torch.no_grad():
                for name, value in transformer.state_dict().items():
                    ema[name].mul_(decay).add_(value.detach(), alpha=1.0 - decay)
            if step % 100 == 0 or step == total - 1:
                log(f"transformer step {step} ({phase.size} px): loss {loss.item():.5f}")
            step += 1
            if cfg.eval_every and step % cfg.eval_every == 0 and group_step < len(order) - 1:
                report(step, phase.size)
        # An interleaved group's seconds are those of its steps together, under the sizes' joint name.
        name = "+".join(str(p.size) for p in group)
        timings.update(clock.per_step(f"transformer_{name}px", len(order)))
        report(step, group[-1].size)
    transformer.eval()
    if progress:
        timings["progress"] = progress
    return ema, timings


# -- output ----------------------------------------------------------------------------------------
@torch.no_grad()
def fp16_is_free(module: Any, probe: Callable[[Any], torch.Tensor], tolerance: float) -> bool:
    """Whether rounding `module`'s weights to fp16 moves `probe`'s output by < tolerance (relative RMS).

    The probe runs in fp32 both times (the weights are rounded, not the arithmetic), as serving on a
    CPU does after loading fp16 files.
    """
    reference = probe(module)
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    module.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in saved.items()})
    rounded = probe(module)
    module.load_state_dict(saved)
    error = (rounded - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt().clamp_min(1e-12)
    return float(error) < tolerance


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_hashes(folder: Path) -> dict[str, str]:
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            out[path.relative_to(folder).as_posix()] = file_sha256(path)
    return out


def config_record(cfg: TrainConfig) -> dict[str, Any]:
    record = dataclasses.asdict(cfg)
    record["phases"] = [dataclasses.asdict(p) for p in cfg.phases]
    return record


def _vae_key(cfg: TrainConfig) -> str:
    """What phase A's result depends on: its settings, the script version and the torch build."""
    fields = {k: v for k, v in config_record(cfg).items() if k.startswith("vae_") or k in ("seed", "threads")}
    fields.update(script=SCRIPT_VERSION, torch=torch.__version__)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def train_and_gate_vae(
    cfg: TrainConfig, *, log: Log = _stderr, cache: Path | None = None
) -> tuple[Any, dict[str, Any], dict[str, float]]:
    """Phase A and its gate: (the VAE, the gate's figures, timings); raises `GateFailed` if enforced.

    With `cache`, a VAE trained before with the same settings (same key) is loaded from there instead
    of trained again: the same bits a rerun would give, so iterating on phase B costs no VAE time.
    """
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg)
    stored = cache / f"vae-{_vae_key(cfg)}.safetensors" if cache is not None else None
    if stored is not None and stored.exists():
        vae.load_state_dict(load_file(stored))
        vae.eval()
        timings = json.loads(stored.with_suffix(".json").read_text())
        log(f"vae: loaded from {stored}")
    else:
        timings = train_vae(cfg, vae, log)
        if stored is not None:
            stored.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(stored))
            stored.with_suffix(".json").write_text(json.dumps(timings))
    gate = vae_gate(cfg, vae)
    log(f"vae gate: {json.dumps(gate)}")
    if not gate["passed"] and cfg.enforce_gate:
        raise GateFailed(
            f"The VAE missed its gate (PSNR {gate['psnr_db']} dB, needs {cfg.psnr_gate}; colour errors: "
            f"{gate['colour_errors'][:4]}): train it for more steps before any transformer step."
        )
    return vae, gate, timings


def train(
    cfg: TrainConfig, out: Path, *, log: Log = _stderr, vae_cache: Path | None = None
) -> dict[str, Any]:
    """Run both phases and write the diffusers folder `out`; return the manifest (plus timings)."""
    from pipelines.tiny import build_tiny_pipeline

    out = Path(out)
    if cfg.init is None:
        vae, gate, timings = train_and_gate_vae(cfg, log=log, cache=vae_cache)
    else:
        vae, transformer = load_init(cfg)
        gate, timings = vae_gate(cfg, vae), {}
        log(f"init from {cfg.init}; vae gate: {json.dumps(gate)}")
        if (read := _init_encoders(Path(cfg.init))) != (cfg.words, cfg.text_residual_scale):
            # Allowed (run 16 did it on purpose), but a fine-tune that forgot --words would otherwise
            # go unnoticed: the transformer has to learn to read the new conditioning.
            log(
                f"warning: {cfg.init} was trained on other text encoders (words={read[0]}, text "
                f"residual scale {read[1]}); this run's transformer must relearn to read its own"
            )
    for p in vae.parameters():
        p.requires_grad_(False)

    # The tiny model's tokenizers and random, frozen text encoders: the toy replaces only what learns.
    pipe = build_tiny_pipeline(world.vocabulary() if cfg.words else (), cfg.text_residual_scale)
    bank = CaptionBank(pipe)
    joint_attention_dim, pooled_dim = bank.widths
    if cfg.init is None:
        transformer = build_transformer(cfg, joint_attention_dim=joint_attention_dim, pooled_dim=pooled_dim)
    ema, phase_timings = train_transformer(
        cfg, transformer, vae, bank, log, pipe=pipe if cfg.eval_every else None
    )
    timings.update(phase_timings)
    transformer.load_state_dict(ema)

    storage = _choose_storage(cfg, transformer, vae, bank)
    for name, module in (("transformer", transformer), ("vae", vae)):
        if storage[name] == "fp16":
            module.to(torch.float16)
    pipe.register_modules(transformer=transformer, vae=vae)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".toy-sd3-", dir=out.parent))
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        manifest: dict[str, Any] = {
            "script": "pipelines.toy.train",
            "script_version": SCRIPT_VERSION,
            "config": config_record(cfg),
            "torch": torch.__version__,
            "vae_gate": gate,
            "progress": timings.get("progress", []),
            "storage": storage,
            "files": file_hashes(staging),
        }
        if cfg.init is not None:
            manifest["parent"] = parent_record(Path(cfg.init))
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {**manifest, "timings": timings}


def load_init(cfg: TrainConfig) -> tuple[Any, Any]:
    """The VAE and transformer of the toy folder `cfg.init`, in fp32 for training."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    assert cfg.init is not None
    folder = Path(cfg.init)
    vae: Any = _without_origin(AutoencoderKL, folder / "vae")
    transformer: Any = _without_origin(SD3Transformer2DModel, folder / "transformer")
    blocks = transformer.config.num_layers
    if blocks != cfg.depth:
        raise ValueError(f"{folder} has {blocks} blocks; pass --depth {blocks}")
    vae.eval()
    return vae, transformer


def parent_record(folder: Path) -> dict[str, Any]:
    """What a fine-tune started from, for its manifest: the `--init` folder's own manifest (its
    settings, its files' checksums and, nested, its own parent), less the progress reports. The
    config's `init` is a path on the training machine; this is what lets a reader of the committed
    folder alone retrace the chain of commands that made it."""
    record = _read_manifest(folder)
    record.pop("progress", None)
    return record


def _init_encoders(folder: Path) -> tuple[bool, float]:
    """The text-encoder settings the toy folder was trained on (the tiny model's where its manifest
    predates them)."""
    config = _read_manifest(folder).get("config", {})
    return bool(config.get("words", False)), float(config.get("text_residual_scale", 1.0))


def trained_unpositioned_scale(folder: Path) -> float:
    """How much larger the folder's training drew a shape whose caption names no position (1 where
    its manifest predates the switch, or where the folder has none): what a render of its world is."""
    return float(_read_manifest(folder).get("config", {}).get("unpositioned_scale", 1.0))


def _read_manifest(folder: Path) -> dict[str, Any]:
    """A toy folder's manifest, or {} for a folder without one."""
    manifest = folder / MANIFEST
    return dict(json.loads(manifest.read_text())) if manifest.is_file() else {}


def _without_origin(cls: Any, folder: Path) -> Any:
    """`cls` from `folder`, in fp32, rebuilt from its config minus `_name_or_path`: a model loaded
    with from_pretrained saves the folder it came from into its config.json, which would put this
    machine's path into the output and make the files depend on where the init folder lay."""
    loaded = cls.from_pretrained(folder, torch_dtype=torch.float32)
    model = cls.from_config({k: v for k, v in loaded.config.items() if k != "_name_or_path"})
    model.load_state_dict(loaded.state_dict())
    return model


def _choose_storage(cfg: TrainConfig, transformer: Any, vae: Any, bank: CaptionBank) -> dict[str, str]:
    rng = np.random.default_rng([cfg.seed, 4])
    gen = torch.Generator().manual_seed(cfg.seed + 4)
    scenes, images = scene_batch(rng, size=64, batch=2)
    context, pooled = bank.get([s.caption.text for s in scenes])
    x0 = encode_latents(vae, images)
    sigma = sample_sigmas(gen, 2)
    s = sigma.view(-1, 1, 1, 1)
    x_t = (1.0 - s) * x0 + s * torch.randn(x0.shape, generator=gen)

    def transformer_probe(m: Any) -> torch.Tensor:
        return velocity(m, x_t, sigma, context, pooled)

    def vae_probe(m: Any) -> torch.Tensor:
        return m.decode(m.encode(images).latent_dist.mean).sample

    return {
        "transformer": "fp16" if fp16_is_free(transformer, transformer_probe, cfg.fp16_tolerance) else "fp32",
        "vae": "fp16" if fp16_is_free(vae, vae_probe, cfg.fp16_tolerance) else "fp32",
        "text_encoders": "fp32",  # the conditioning was computed with fp32 encoders: keep them exact
    }


# -- command line ----------------------------------------------------------------------------------
def _share(text: str) -> float:
    """A share in [0, 1] (NaN is not one: every comparison with it is false, so it would train nothing)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share between 0 and 1")
    return value


def _arguments(argv: list[str] | None) -> tuple[TrainConfig, Path, bool, Path | None]:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.toy.train",
        description="Train the toy SD3 (VAE, gate, transformer) into a diffusers folder. Deterministic: "
        "fixed seeds, steps and threads.",
    )
    parser.add_argument("out", type=Path, help="the diffusers folder to write (replaced if it exists)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch.set_num_threads")
    parser.add_argument("--vae-steps", type=int, default=defaults.vae_steps)
    parser.add_argument("--vae-size", type=int, default=defaults.vae_size)
    parser.add_argument("--vae-batch", type=int, default=defaults.vae_batch)
    parser.add_argument("--vae-lr", type=float, default=defaults.vae_lr)
    parser.add_argument(
        "--depth", type=int, default=defaults.depth, help="transformer blocks (hidden 64·depth)"
    )
    parser.add_argument(
        "--phase",
        action="append",
        type=Phase.parse,
        help="SIZE:STEPS:BATCH[:POOL][@SHIFT] of a transformer phase, repeatable, in order; a leading + "
        "runs it interleaved with the phase before it; @SHIFT trains its σ at that time shift "
        f"(default {FLOW_SHIFT:g}) (default phases: "
        + " ".join(f"{p.size}:{p.steps}:{p.batch}" for p in defaults.phases)
        + ")",
    )
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="steps of linear lr warm-up")
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="bf16 autocast of the transformer's forward (CPUs with native bf16 only)",
    )
    parser.add_argument("--psnr-gate", type=float, default=defaults.psnr_gate)
    parser.add_argument(
        "--shape-weight",
        type=float,
        default=defaults.shape_weight,
        help="extra loss weight inside the shape (0: plain MSE)",
    )
    parser.add_argument(
        "--edge-weight",
        type=float,
        default=defaults.edge_weight,
        help="extra loss weight within one latent pixel of the shape's outline, where its kind shows",
    )
    parser.add_argument(
        "--partial",
        type=_share,
        default=defaults.partial,
        help="share of the (not dropped) captions trained as a shorter prompt still true of the image "
        '("red", "a red circle", "a circle", "a blue background")',
    )
    parser.add_argument(
        "--drop-pooled",
        type=_share,
        default=defaults.drop_pooled,
        help="share of the (not dropped) captions trained with the empty prompt's pooled vector, so that "
        "the context tokens, which a (word:1.5) weight moves, must carry the caption",
    )
    parser.add_argument(
        "--unpositioned",
        choices=world.UNPOSITIONED,
        default=defaults.unpositioned,
        help="where the transformer's scenes put a shape whose caption names no place: anywhere, or "
        "one of the nine cells of the position words",
    )
    parser.add_argument(
        "--unpositioned-share",
        type=float,
        default=defaults.unpositioned_share,
        help="share of the transformer's scenes whose caption names no position (default: as in the "
        "caption set, a tenth)",
    )
    parser.add_argument(
        "--unpositioned-scale",
        type=float,
        default=defaults.unpositioned_scale,
        help="how much larger (in half-size) than a positioned shape a shape whose caption names no "
        "position is drawn (default 1: the same)",
    )
    parser.add_argument(
        "--words",
        action="store_true",
        help="tokenizers that make each word of the world's captions one token (default: one a character)",
    )
    parser.add_argument(
        "--text-residual-scale",
        type=float,
        default=defaults.text_residual_scale,
        help="scale of the random text encoders' residual branches; below 1 a word's encoding stays "
        "more at its own position",
    )
    parser.add_argument(
        "--init",
        help="a toy folder whose VAE and transformer phase B starts from (phase A is skipped)",
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=defaults.eval_every,
        help="steps between adherence reports (0: none)",
    )
    parser.add_argument(
        "--vae-cache",
        type=Path,
        help="a folder where phase A's VAE is kept by its settings, and reused by a rerun with the same ones",
    )
    parser.add_argument(
        "--vae-only",
        action="store_true",
        help="train the VAE and report its gate, then stop (writes nothing): to size --vae-steps",
    )
    parser.add_argument(
        "--no-gate",
        action="store_true",
        help="go on to the transformer even if the VAE misses its gate (smoke tests of the script only)",
    )
    args = parser.parse_args(argv)
    if not args.text_residual_scale > 0:
        parser.error("--text-residual-scale must be positive")
    if args.unpositioned_share is not None and not 0.0 <= args.unpositioned_share <= 1.0:
        parser.error("--unpositioned-share must lie in [0, 1]")
    try:
        world.check_unpositioned_scale(args.unpositioned_scale, args.unpositioned)
    except ValueError as error:
        parser.error(f"--unpositioned-scale: {error}")
    try:
        stages(args.phase or [])
    except ValueError as error:
        parser.error(f"--phase: {error} (drop its +)")
    cfg = dataclasses.replace(
        defaults,
        seed=args.seed,
        threads=args.threads,
        vae_steps=args.vae_steps,
        vae_size=args.vae_size,
        vae_batch=args.vae_batch,
        vae_lr=args.vae_lr,
        depth=args.depth,
        phases=tuple(args.phase) if args.phase else defaults.phases,
        lr=args.lr,
        autocast_bf16=args.bf16,
        psnr_gate=args.psnr_gate,
        enforce_gate=not args.no_gate,
        eval_every=args.eval_every,
        shape_weight=args.shape_weight,
        edge_weight=args.edge_weight,
        partial=args.partial,
        drop_pooled=args.drop_pooled,
        unpositioned=args.unpositioned,
        unpositioned_share=args.unpositioned_share,
        unpositioned_scale=args.unpositioned_scale,
        words=args.words,
        text_residual_scale=args.text_residual_scale,
        init=args.init,
        warmup=args.warmup,
    )
    return cfg, args.out, args.vae_only, args.vae_cache


def main(argv: list[str] | None = None) -> int:
    cfg, out, vae_only, vae_cache = _arguments(argv)
    from pipelines.loading import cpu_has_native_bf16, quiet_libraries

    quiet_libraries()
    if cfg.autocast_bf16 and not cpu_has_native_bf16():
        # Still run (a rerun of a recorded command must be possible anywhere), but say what it costs.
        _stderr(
            "warning: --bf16 on a CPU without native bf16 (no AVX512-BF16 or AMX): emulated bf16 "
            "made a training step about 20x slower than fp32 on an AVX2 machine "
            "(benchmarks/toy_train_step.py); drop --bf16 unless you are repeating a bf16 run"
        )
    try:
        if vae_only:
            # Report the gate whatever its outcome: the exit status says whether it passed.
            _, gate, timings = train_and_gate_vae(
                dataclasses.replace(cfg, enforce_gate=False), cache=vae_cache
            )
            print(json.dumps({"vae_gate": gate, "timings": timings}, indent=2))
            return 0 if gate["passed"] else 2
        result = train(cfg, out, vae_cache=vae_cache)
    except GateFailed as exc:
        _stderr(str(exc))
        return 2
    print(
        json.dumps({"out": str(out), "vae_gate": result["vae_gate"], "timings": result["timings"]}, indent=2)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
