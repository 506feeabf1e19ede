"""A LoRA for the trained toy that runs at guidance 1 what the served defaults run at CFG 5 (issue 16's
few-step mode).

The teacher is the toy as a client gets it at the API's defaults: CFG 5 with the hosted negative
window, two transformer forwards a step. The student is the same transformer with a LoRA, run at
guidance 1 (one forward a step, the negative prompt unused). Three ways to teach it (`--method`):

**guidance** (guidance distillation, Meng et al. 2023): at a noised render x_σ = (1−σ)·x0 + σ·ε of the
toy world, the student's target is the teacher's guided velocity there, v_u + 5·(v_c − v_u), with
the negative the hosted window makes active at that σ. It learns the teacher's vector field, not its
trajectories, so any sampler and step count at guidance 1 then does what it does on the base model at
CFG 5, for half the forwards; and, being pointwise, it can be taught at several sizes at once
(`--extra-size`).

**reflow** (the default, as §15 of docs/toy.md measured it): the teacher's whole sampling run
(DPM++ 2M, 25 steps) is the target, and the student, run with Euler, learns the teacher's own
couplings: for a caption c and the start noise ε the server draws for a seed, x0 is the latent the
teacher reaches from ε. At x_σ = (1−σ)·x0 + σ·ε the student's target is v = ε − x0, the
straight line from ε to x0 (rectified flow's "reflow", Liu et al. 2022, with the guidance folded
in as guidance distillation does). Every point of that line points at the same end, so a student that
fitted it exactly would reach x0 in one Euler step; the fit is what the step count then buys back.

**phased** (a fixed few-step schedule, as progressive distillation, Salimans & Ho 2022, and
Hyper-SD's segments target one): the student learns only the `--phases` Euler steps a client of the
few-step mode runs (Euler, sgm_uniform, shift 3, `--phases` steps). The teacher's run is recorded at
each σ of that schedule (`SD3Generator.sample_trajectory` adds them to its own 25 steps), and from
the teacher's state x_k at σ_k the student's one Euler step should land on the teacher's x_{k+1}:
the target velocity is the secant (x_{k+1} − x_k)/(σ_{k+1} − σ_k), and the loss is the miss in the
latent. Reflow asks one straight line to reach the end from anywhere on it; this asks K short ones,
each from a point the student will start from, so it fits what is measured (the image after K
steps) and nothing else: the LoRA is for that step count only. Taught only from the teacher's states
(teacher forcing), the student never sees where its own earlier steps put it; `--student-states F`
starts a share F of each batch from the student's own state at σ_k instead (its Euler steps from the
teacher's noise, taken without gradients), with the same target, the teacher's x_{k+1}, so it learns
to step back onto the teacher's path. `--init DIR` goes on from a saved LoRA, e.g. a teacher-forced one.
Its schedule's σ's are the same at every size, but the teacher's states are not: `--extra-size S`
has the teacher run as many pixels again at S (`--pairs` × (size/S)² pairs, kept in their own file)
and the student's steps take the sizes in turn, each at the batch of as many pixels.

    python -m pipelines.toy.distill OUT --threads 2   # ~1 h on 2 cores: 28 min of pairs, 30 of steps
    sd3-server serve --model toy --lora OUT          # then: scheduler Euler, guidance_scale 1
    python -m pipelines.toy.distill OUT --method guidance --extra-size 512   # then: guidance_scale 1
    python -m pipelines.toy.distill OUT --method phased --phases 4 --rank 32 --pairs 768 --steps 1000
        # ~1 h 25 min on one core: 40 min of pairs, 43 of steps; then: Euler, 4 steps, guidance 1.
        # then --init OUT --student-states 0.5 --steps 300 --lr 3e-4 --warmup 20 into OUT2 (19 min),
        # then --init OUT2 --student-states 1.0 --steps 300 --lr 2e-4 --warmup 20 into OUT3 (20 min),
        # then --init OUT3 --extra-size 512 --batch 16 --student-states 1.0 --steps 240 --lr 2e-4
        # --warmup 10 into OUT4 (41 min on two cores): pipelines/toy/few-step-4 is OUT4 (docs/toy.md
        # §35-36, §38, §44); with --phases 10 throughout (400 steps in the third stage),
        # pipelines/toy/few-step-10 (§37-38, §42-43).

In reflow and phased, the teacher's pairs are the slow part (1.7 s a pair on two cores at 256 px); they
are kept in OUT/teacher-pairs.pt (an extra size's in OUT/teacher-pairs-S.pt) and reused by a rerun
with the same pair settings and the same teacher weights (by content: a moved checkout reuses them,
retrained weights do not). Fixed seeds and a fixed thread count give the same LoRA on a rerun up to
float rounding (not always bit for bit: the CPU kernels' last bits vary from run to run here).
`python benchmarks/quality.py --only few-step --lora OUT` measures the result (docs/toy.md §15).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.loading import ModelSpec, load_model
from pipelines.request import GenerationRequest
from pipelines.sd3 import SD3Generator
from pipelines.toy import MODEL_DIR, world
from pipelines.toy.train import CaptionBank, LatentPool, file_hashes, file_sha256, velocity
from schedulers.guidance import NEGATIVE, ZERO_NEGATIVE, CondRange
from schedulers.noise import initial_noise
from schedulers.sigmas import time_shift

SCRIPT_VERSION = "3"
METHODS = ("reflow", "guidance", "phased")
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PAIRS_FILE = "teacher-pairs.pt"
# The layers a LoRA for SD3 usually covers (diffusers' SD3 DreamBooth-LoRA script, Hyper-SD3): both
# streams' attention projections and feed-forwards of every joint block.
TARGET_MODULES = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)
# Training pairs' image seeds start here, far from the small seeds the benchmarks and tests draw.
SEED_BASE = 10**6


@dataclass(frozen=True)
class DistillConfig:
    model: str = str(MODEL_DIR)
    method: str = "reflow"
    pairs: int = 1024  # reflow and phased: teacher runs
    phases: int = 4  # phased: the student's Euler steps, the only step count it is taught
    # phased: the share of each batch that starts from the student's own state at σ_k (its Euler
    # steps from the teacher's noise) rather than the teacher's; the target is still the teacher's
    # next state, so the student learns to steer back onto the trajectory it drifts off.
    student_states: float = 0.0
    init: str | None = None  # a LoRA folder (of the same rank) to start from instead of B = 0
    size: int = 256
    # guidance and phased: more sizes, trained in turn, each at the batch that holds as many pixels as
    # `batch` images at `size`; guidance renders `pool` scenes at `size`, phased has the teacher run
    # `pairs` at `size`, and each takes as many pixels again at the others (`pairs_at`).
    extra_sizes: tuple[int, ...] = ()
    pool: int = 2048
    steps: int = 1200
    batch: int = 16
    rank: int = 16
    lr: float = 1e-3
    warmup: int = 50
    # Reflow and guidance (phased takes its σ's from the schedule it is taught): the student's σ, t
    # uniform, time-shifted by the served default shift, so it trains where the few-step schedules put
    # their steps; this share of each batch sits at σ = 1, the first step of every schedule and the
    # one that decides the image.
    shift: float = 3.0
    at_one: float = 0.1
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.extra_sizes and self.method == "reflow":
            raise ValueError("extra sizes are for --method guidance or phased: reflow's pairs have one size")
        if len(set(self.sizes)) < len(self.sizes):
            raise ValueError(f"each size is trained once, not {self.sizes}")
        for name in ("pairs", "steps", "batch", "rank", "threads", "pool", "phases"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.warmup < 0 or self.seed < 0:
            raise ValueError("warmup and seed must not be negative")
        for size in (self.size, *self.extra_sizes):
            if size < 16 or size % 16:
                raise ValueError(
                    f"a size must be a positive multiple of 16 (SD3's 2x2 patches of an 8x latent), "
                    f"not {size}"
                )
        # `not (0 < x)` also refuses NaN, which every comparison is false for.
        if not (0.0 < self.lr < math.inf) or not (0.0 < self.shift < math.inf):
            raise ValueError("lr and shift must be positive and finite")
        for name in ("at_one", "student_states"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a share between 0 and 1, not {getattr(self, name)}")
        if self.init is not None and not (Path(self.init) / WEIGHT_NAME).is_file():
            raise ValueError(f"--init names a folder with {WEIGHT_NAME}, and {self.init} has none")
        if self.student_states and self.method != "phased":
            raise ValueError("student states are for --method phased: the others have no steps to roll")

    def pair_key(self) -> dict[str, Any]:
        """What the teacher pairs depend on. The teacher is named by its files' contents, not its path,
        so a moved checkout reuses its pairs and retrained weights do not."""
        key = {
            "teacher": teacher_digest(Path(self.model)),
            "pairs": self.pairs,
            "size": self.size,
            "seed": self.seed,
        }
        # Reflow's key predates the other methods and stays as it was, so its cached pairs still serve.
        return key | {"method": self.method, "phases": self.phases} if self.method == "phased" else key

    @property
    def sizes(self) -> tuple[int, ...]:
        return (self.size, *self.extra_sizes)

    def as_many_pixels(self, count: int, size: int) -> int:
        """How many images at `size` hold about as many pixels as `count` at the first size."""
        return max(1, round(count * (self.size / size) ** 2))

    def pairs_at(self, size: int) -> int:
        """Teacher runs at `size`: `pairs` at the first size, as many pixels at the others."""
        return self.as_many_pixels(self.pairs, size)

    def at_size(self, size: int) -> DistillConfig:
        """This run's teacher pairs at one of its sizes, keyed as a run at that size alone keys them:
        the first size's are the single-size run's, so its cached pairs serve a run that adds sizes."""
        return replace(self, size=size, pairs=self.pairs_at(size), extra_sizes=())

    def batch_at(self, size: int) -> int:
        """The batch at `size`: about as many pixels as `batch` images at the first size."""
        return self.as_many_pixels(self.batch, size)


def teacher_digest(folder: Path) -> str:
    """One sha256 over the teacher folder's files and their names (its manifest excluded)."""
    return hashlib.sha256(json.dumps(file_hashes(folder), sort_keys=True).encode()).hexdigest()


def teacher_request(size: int) -> GenerationRequest:
    """The served defaults (docs/contract.md §1.1) at `size`: what the student learns to reproduce."""
    return GenerationRequest(prompt="", width=size, height=size)


def guided_velocity(
    teacher: Any,
    x_t: torch.Tensor,
    sigma: torch.Tensor,
    positive: tuple[torch.Tensor, torch.Tensor],
    negative: tuple[torch.Tensor, torch.Tensor],
    *,
    cfg: float,
    ranges: tuple[CondRange, ...],
) -> torch.Tensor:
    """The teacher's CFG velocity at each sample's own σ, as `schedulers.guidance.GuidedDenoiser`
    combines it: the uncond is the mean of the negatives active at that σ (`negative` is the negative
    prompt's (context, pooled), one row; the zeroed-out negative is all zeros), or 0 where none is.
    D = x − σ·v is affine in v, so combining velocities is combining denoised predictions."""
    batch = x_t.shape[0]
    v_cond = velocity(teacher, x_t, sigma, *positive)
    uncond = torch.zeros_like(v_cond)
    count = torch.zeros(batch)
    for name in (NEGATIVE, ZERO_NEGATIVE):
        entry = next((r for r in ranges if r.name == name), None)
        if entry is None:
            continue
        rows = torch.tensor([entry.active(float(s)) for s in sigma])
        if not rows.any():
            continue
        n = int(rows.sum())
        context, pooled = negative
        if name == ZERO_NEGATIVE:
            context, pooled = torch.zeros_like(context), torch.zeros_like(pooled)
        uncond[rows] += velocity(
            teacher, x_t[rows], sigma[rows], context.expand(n, -1, -1), pooled.expand(n, -1)
        )
        count[rows] += 1
    active = count > 0
    s = sigma.view(-1, 1, 1, 1)
    # Where no negative is active, upstream's uncond *denoised* is 0, so D = cfg·D_c.
    gap = ((1.0 - cfg) * x_t + cfg * s * v_cond) / s
    v_uncond = uncond / count.clamp(min=1).view(-1, 1, 1, 1)
    guided = v_uncond + cfg * (v_cond - v_uncond)
    return torch.where(active.view(-1, 1, 1, 1), guided, gap)


def student_request(size: int, steps: int) -> GenerationRequest:
    """How a client asks for the distilled mode: Euler, guidance 1, `steps` steps."""
    return GenerationRequest(
        prompt="", width=size, height=size, scheduler="Euler", guidance_scale=1.0, steps=steps
    )


def student_sigmas(size: int, steps: int) -> torch.Tensor:
    """The schedule a client of the few-step mode samples down: `student_request`'s sigmas."""
    return student_request(size, steps).sigmas()


def baseline_requests(size: int, steps: int) -> dict[str, GenerationRequest]:
    """What a LoRA run as `student_request(size, steps)` is judged against, on the base model: the
    same steps at guidance 1 (the LoRA's own request: what the LoRA adds), and half the steps at the
    teacher's CFG (the same transformer forwards: what the same work buys without it)."""
    fast = student_request(size, steps)
    cfg = teacher_request(size).guidance_scale
    return {"same work": replace(fast, steps=steps // 2, guidance_scale=cfg), "guidance 1": fast}


def training_pairs(cfg: DistillConfig) -> list[tuple[world.Caption, int]]:
    """Distinct captions from the whole set, each with its own image seed."""
    captions = world.all_captions()
    rng = np.random.default_rng([cfg.seed, 11])
    chosen = rng.choice(len(captions), size=cfg.pairs, replace=cfg.pairs > len(captions))
    return [(captions[int(i)], SEED_BASE + k) for k, i in enumerate(chosen)]


def load_generator(model: str) -> SD3Generator:
    spec = ModelSpec(source=model, tiny_dir=Path(model), device="cpu", dtype="fp32")
    return SD3Generator(load_model(spec))


def teacher_pairs(cfg: DistillConfig, generator: SD3Generator, log: Any, *, chunk: int = 8) -> dict[str, Any]:
    """Noise, conditioning and the teacher's final latent of every training pair; for phased, also the
    teacher's states at the student's σ's (`states`, [pairs, phases + 1, C, h, w], and `sigmas`)."""
    pairs = training_pairs(cfg)
    base = teacher_request(cfg.size)
    latent = (generator.latent_channels, cfg.size // 8, cfg.size // 8)
    stops = student_sigmas(cfg.size, cfg.phases) if cfg.method == "phased" else None
    x0, eps, contexts, pooled, states = [], [], [], [], []
    started = time.perf_counter()
    for start in range(0, len(pairs), chunk):  # the teacher's batch, not the student's
        some = pairs[start : start + chunk]
        requests = [replace(base, prompt=c.text, seed=s) for c, s in some]
        if stops is None:
            x0.append(generator.sample_latents(requests))
        else:
            states.append(generator.sample_trajectory(requests, stops.tolist()))
            x0.append(states[-1][:, -1])
        # The noise the server draws for each seed (σ0 = 1, so it is the start latent itself).
        eps.append(torch.cat([initial_noise(s, (1, *latent)) for _, s in some]))
        for caption, _ in some:
            cond = generator.encode(caption.text)
            contexts.append(cond.context)
            pooled.append(cond.pooled)
        done = start + len(some)
        per_pair = (time.perf_counter() - started) / done
        log(f"teacher pairs {done}/{len(pairs)} at {cfg.size} px ({per_pair:.2f} s a pair)")
    final = torch.cat(x0)
    if not torch.isfinite(final).all():
        raise RuntimeError("the teacher produced non-finite latents")
    data = {
        "key": cfg.pair_key(),
        "x0": final,
        "eps": torch.cat(eps),
        "context": torch.cat(contexts),
        "pooled": torch.cat(pooled),
        "seconds_per_pair": (time.perf_counter() - started) / len(pairs),
    }
    if stops is not None:
        data |= {"states": torch.cat(states), "sigmas": stops}
    return data


def add_lora(transformer: Any, rank: int, seed: int) -> list[torch.nn.Parameter]:
    """A fresh LoRA on the transformer (B = 0: the student starts as the teacher's model); its parameters."""
    from peft import LoraConfig

    torch.manual_seed(seed)
    for p in transformer.parameters():
        p.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(TARGET_MODULES))
    )
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def _schedule_lr(optimizer: torch.optim.Optimizer, cfg: DistillConfig, step: int) -> None:
    """Linear warm-up, then a cosine to zero over the run."""
    warm = min(1.0, (step + 1) / max(cfg.warmup, 1))
    decay = 0.5 * (1.0 + np.cos(np.pi * step / cfg.steps))
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * warm * decay


def _student_sigmas(cfg: DistillConfig, gen: torch.Generator, batch: int) -> torch.Tensor:
    """The student's σ: uniform t through the time shift, with a share `at_one` at σ = 1."""
    t = torch.rand(batch, generator=gen)
    t = torch.where(torch.rand(batch, generator=gen) < cfg.at_one, torch.ones_like(t), t)
    return time_shift(t, cfg.shift)


def load_init(transformer: Any, folder: Path) -> None:
    """Set the LoRA that `add_lora` made to the one saved in `folder` (by `save_lora`, same rank)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(folder / WEIGHT_NAME)
    # save_lora_weights prefixes every key with the pipeline component's name.
    state = {k.removeprefix("transformer."): v.to(torch.float32) for k, v in saved.items()}
    try:
        result: Any = set_peft_model_state_dict(transformer, state, adapter_name="default")
    except RuntimeError as exc:  # torch's size mismatch: a LoRA of another rank
        raise ValueError(f"{folder} is not a LoRA of the student's rank: {exc}") from exc
    if result.unexpected_keys:
        raise ValueError(f"{folder} is not a LoRA of this shape: {sorted(result.unexpected_keys)[:3]}")
    ours = {n for n, _ in transformer.named_parameters() if "lora_" in n}
    if len(state) != len(ours):
        raise ValueError(f"{folder} covers {len(state)} LoRA tensors, the student has {len(ours)}")


def _student(cfg: DistillConfig, transformer: Any) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    """A LoRA on `transformer` (fresh, or `cfg.init`), set to train, and its optimizer."""
    params = add_lora(transformer, cfg.rank, cfg.seed)
    if cfg.init is not None:
        load_init(transformer, Path(cfg.init))
    transformer.train()
    return params, torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)


def _descend(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], loss: torch.Tensor) -> float:
    """One optimizer step on `loss`, gradients clipped to norm 1; the loss as a number."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return loss.item()


class _Progress:
    """The student's loss, logged as its mean over every 50 steps, with the time a step has taken."""

    def __init__(self, log: Any, steps: int) -> None:
        self.log, self.steps, self.started = log, steps, time.perf_counter()
        self.recent: list[float] = []

    def add(self, step: int, loss: float) -> None:
        self.recent.append(loss)
        if step % 50 == 0 or step == self.steps - 1:
            self.log(
                f"student step {step}: loss {np.mean(self.recent):.6f} "
                f"({self.seconds_per_step(step + 1):.2f} s a step)"
            )
            self.recent = []

    def seconds_per_step(self, done: int | None = None) -> float:
        return (time.perf_counter() - self.started) / (done or self.steps)


def train_student(cfg: DistillConfig, transformer: Any, data: dict[str, Any], log: Any) -> dict[str, float]:
    params, optimizer = _student(cfg, transformer)
    gen = torch.Generator().manual_seed(cfg.seed + 5)
    count = data["x0"].shape[0]
    progress = _Progress(log, cfg.steps)
    for step in range(cfg.steps):
        _schedule_lr(optimizer, cfg, step)
        idx = torch.randint(0, count, (cfg.batch,), generator=gen)
        x0, eps = data["x0"][idx], data["eps"][idx]
        sigma = _student_sigmas(cfg, gen, cfg.batch)
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1.0 - s) * x0 + s * eps
        # fp32: no bf16 autocast as the toy's own training has. With the base weights frozen, torch
        # 2.13's CPU backward runs the bf16 input-gradient matmuls in its reference gemm, 25x slower
        # (41 s a step against fp32's 1.7 at 256 px, batch 16, 2 threads).
        v = velocity(transformer, x_t, sigma, data["context"][idx], data["pooled"][idx])
        progress.add(step, _descend(optimizer, params, torch.nn.functional.mse_loss(v, eps - x0)))
    transformer.eval()
    return {"seconds_per_step": progress.seconds_per_step()}


def rolled_states(
    transformer: Any,
    start: torch.Tensor,
    sigmas: torch.Tensor,
    k: torch.Tensor,
    context: torch.Tensor,
    pooled: torch.Tensor,
) -> torch.Tensor:
    """Where the student's own Euler steps from `start` (at sigmas[0]) are at sigmas[k], row by row,
    without gradients: a row leaves the batch once it has taken its k steps, so the transformer sees
    sum(k) rows in all."""
    x = start.clone()
    with torch.no_grad():
        for j in range(int(k.max()) if len(k) else 0):
            rows = k > j
            n = int(rows.sum())
            v = velocity(transformer, x[rows], sigmas[j].expand(n), context[rows], pooled[rows])
            x[rows] = x[rows] + (sigmas[j + 1] - sigmas[j]) * v
    return x


def train_phased_student(
    cfg: DistillConfig, transformer: Any, data: list[dict[str, Any]], log: Any
) -> dict[str, float]:
    """Phased (module docstring): from the teacher's state at a random one of the student's σ's, the
    student's Euler step should land on the teacher's state at the next. `data` is the teacher's
    pairs at each of `cfg.sizes`, in that order, taken in turn."""
    params, optimizer = _student(cfg, transformer)
    gen = torch.Generator().manual_seed(cfg.seed + 5)
    progress = _Progress(log, cfg.steps)
    for step in range(cfg.steps):
        _schedule_lr(optimizer, cfg, step)
        at = step % len(data)
        states, sigmas = data[at]["states"], data[at]["sigmas"]
        count, phases = states.shape[0], states.shape[1] - 1
        batch = cfg.batch_at(cfg.sizes[at])
        idx = torch.randint(0, count, (batch,), generator=gen)
        k = torch.randint(0, phases, (batch,), generator=gen)
        x, reached = states[idx, k], states[idx, k + 1]
        context, pooled = data[at]["context"][idx], data[at]["pooled"][idx]
        if cfg.student_states:  # drawn only then, so that a teacher-forced run's stream is unchanged
            own = torch.rand(batch, generator=gen) < cfg.student_states
            # x is the batch's own copy (advanced indexing): the cached states are not written.
            x[own] = rolled_states(
                transformer, states[idx[own], 0], sigmas, k[own], context[own], pooled[own]
            )
        dt = (sigmas[k + 1] - sigmas[k]).view(-1, 1, 1, 1)
        v = velocity(transformer, x, sigmas[k], context, pooled)
        # The miss in the latent, not in v: the last step's Δσ is five times the first's, and an error
        # in v costs Δσ times as much in the image there.
        progress.add(step, _descend(optimizer, params, torch.nn.functional.mse_loss(x + dt * v, reached)))
    transformer.eval()
    return {"seconds_per_step": progress.seconds_per_step()}


def train_guidance_student(cfg: DistillConfig, generator: SD3Generator, log: Any) -> dict[str, float]:
    """Guidance distillation (module docstring): the student at guidance 1 fits the teacher's CFG
    velocity on noised renders of the world, the sizes taken in turn."""
    pipe = generator.pipe
    transformer = pipe.transformer
    teacher = copy.deepcopy(transformer).eval().requires_grad_(False)
    rng = np.random.default_rng([cfg.seed, 13])
    started = time.perf_counter()
    pools = {}
    for size in cfg.sizes:
        count = max(cfg.batch_at(size), cfg.as_many_pixels(cfg.pool, size))
        pools[size] = LatentPool(pipe.vae, rng, size=size, count=count)
        log(f"pool {size} px: {count} scenes ({time.perf_counter() - started:.0f} s)")
    pool_seconds = time.perf_counter() - started
    bank = CaptionBank(pipe)
    negative = (bank.empty_context[None], bank.empty_pooled[None])  # the default negative prompt, ""
    teacher_at = teacher_request(cfg.size)
    guidance, ranges = teacher_at.guidance_scale, generator.negative_ranges(teacher_at)
    params, optimizer = _student(cfg, transformer)
    gen = torch.Generator().manual_seed(cfg.seed + 5)
    progress = _Progress(log, cfg.steps)
    for step in range(cfg.steps):
        _schedule_lr(optimizer, cfg, step)
        size = cfg.sizes[step % len(cfg.sizes)]
        batch = cfg.batch_at(size)
        captions, x0, _ = pools[size].draw(rng, batch)
        positive = bank.get([c.text for c in captions])
        eps = torch.randn(x0.shape, generator=gen)
        sigma = _student_sigmas(cfg, gen, batch)
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1.0 - s) * x0 + s * eps
        with torch.no_grad():
            target = guided_velocity(teacher, x_t, sigma, positive, negative, cfg=guidance, ranges=ranges)
        loss = torch.nn.functional.mse_loss(velocity(transformer, x_t, sigma, *positive), target)
        progress.add(step, _descend(optimizer, params, loss))
    transformer.eval()
    return {"seconds_per_step": progress.seconds_per_step(), "pool_seconds": pool_seconds}


def save_lora(transformer: Any, out: Path) -> Path:
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    state = {
        k: v.detach().to(torch.float16).contiguous()
        for k, v in get_peft_model_state_dict(transformer).items()
    }
    metadata = transformer.peft_config["default"].to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])
    StableDiffusion3Pipeline.save_lora_weights(
        out, transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata
    )
    return out / WEIGHT_NAME


def _sized_pairs_file(size: int) -> str:
    return f"teacher-pairs-{size}.pt"


def pairs_file(cfg: DistillConfig, size: int) -> str:
    """Where a run keeps its teacher pairs at `size`: the first size's where a single-size run does."""
    return PAIRS_FILE if size == cfg.size else _sized_pairs_file(size)


def _still_valid(data: dict[str, Any], cfg: DistillConfig) -> bool:
    if data.get("key") != cfg.pair_key():
        return False
    # Phased states sit at the served schedule's σ's, which the key does not name: a change to how
    # the server spaces them must not reuse states taken at the old ones.
    return cfg.method != "phased" or torch.equal(data["sigmas"], student_sigmas(cfg.size, cfg.phases))


def _cached_pairs(
    cfg: DistillConfig, out: Path, name: str, generator: SD3Generator, log: Any
) -> dict[str, Any]:
    """`teacher_pairs(cfg)` (`cfg` at one size), read back from `out` where a run with the same pair
    key left them, under either name (a single-size run's file, or a two-size run's for that size);
    else run and kept in `out/name`."""
    for cached in dict.fromkeys([out / name, out / PAIRS_FILE, out / _sized_pairs_file(cfg.size)]):
        data = torch.load(cached) if cached.exists() else None
        if data is not None and _still_valid(data, cfg):
            log(f"teacher pairs read from {cached}")
            return data
    data = teacher_pairs(cfg, generator, log)
    # Written aside and renamed: a run killed while saving leaves the old file or none, never a torn one.
    partial = out / f"{name}.partial"
    torch.save(data, partial)
    os.replace(partial, out / name)
    return data


def distill(cfg: DistillConfig, out: Path, *, log: Any = print) -> dict[str, Any]:
    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    # Read before training: with --init OUT, saving the result replaces the LoRA it started from.
    init = {"init_sha256": file_sha256(Path(cfg.init) / WEIGHT_NAME)} if cfg.init else {}
    generator = load_generator(cfg.model)
    if cfg.method == "guidance":
        timings = train_guidance_student(cfg, generator, log)
        roles: dict[str, Any] = {
            "teacher": "the API defaults' guidance: CFG 5 with the hosted negative window",
            "student": "guidance 1, any sampler",
        }
    else:
        sized = [
            _cached_pairs(cfg.at_size(size), out, pairs_file(cfg, size), generator, log) for size in cfg.sizes
        ]
        data = sized[0]
        teacher = "the API defaults: DPM++ 2M, 25 steps, CFG 5, shift 3, the hosted negative window"
        if cfg.method == "phased":
            timings = train_phased_student(cfg, generator.pipe.transformer, sized, log)
            roles = {
                "teacher": f"{teacher}, with the student's σ's added to its schedule",
                "student": f"Euler (sgm_uniform, shift 3) at guidance 1, exactly {cfg.phases} steps",
                # The schedule is the same at every size: sgm_uniform's σ's do not depend on it.
                "student_sigmas": [float(s) for s in data["sigmas"]],
            }
        else:
            timings = train_student(cfg, generator.pipe.transformer, data, log)
            roles = {"teacher": teacher, "student": "Euler at guidance 1"}
        timings["seconds_per_pair"] = data["seconds_per_pair"]
        timings |= {f"seconds_per_pair_{d['key']['size']}": d["seconds_per_pair"] for d in sized[1:]}
    weights = save_lora(generator.pipe.transformer, out)
    manifest = {
        "script_version": SCRIPT_VERSION,
        "config": asdict(cfg) | {"model": Path(cfg.model).name},
        **init,
        # The teacher by content (as the pairs' key names it): a LoRA is only for the weights it was
        # distilled from, and a retrained toy makes a committed one stale.
        "teacher_digest": teacher_digest(Path(cfg.model)),
        **roles,
        **timings,
        "sha256": {WEIGHT_NAME: file_sha256(weights)},
    }
    (out / "distill-manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    defaults = DistillConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the LoRA (and the cached teacher pairs)")
    parser.add_argument("--model", default=defaults.model, help="the teacher: a toy diffusers folder")
    parser.add_argument(
        "--method", choices=METHODS, default=defaults.method, help="see the module's docstring"
    )
    parser.add_argument(
        "--extra-size",
        type=int,
        action="append",
        default=[],
        help="guidance and phased: also train at this size, in turn (repeatable)",
    )
    for name in ("pairs", "phases", "size", "steps", "batch", "rank", "warmup", "seed", "threads", "pool"):
        parser.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    parser.add_argument("--init", help="a LoRA folder (same rank) to start from, e.g. a teacher-forced run's")
    for name in ("lr", "shift", "at_one", "student_states"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    args = parser.parse_args(argv)
    try:
        cfg = DistillConfig(
            model=args.model,
            method=args.method,
            pairs=args.pairs,
            phases=args.phases,
            size=args.size,
            extra_sizes=tuple(args.extra_size),
            pool=args.pool,
            steps=args.steps,
            batch=args.batch,
            rank=args.rank,
            lr=args.lr,
            warmup=args.warmup,
            shift=args.shift,
            at_one=args.at_one,
            student_states=args.student_states,
            init=args.init,
            seed=args.seed,
            threads=args.threads,
        )
    except ValueError as exc:
        parser.error(str(exc))
    manifest = distill(cfg, args.out, log=lambda m: print(m, flush=True))
    print(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
