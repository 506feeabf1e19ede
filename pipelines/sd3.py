"""The generator: prompt encoding, the ComfyUI-math denoising loop of docs/sampling.md §9, VAE decode.

diffusers provides the components (text encoders, `SD3Transformer2DModel`, VAE); the loop is our
own, because the hosted API's parameters are ComfyUI's and stock diffusers schedulers reproduce
only a few of them (docs/sampling.md §10). The sampler state stays float32 whatever the
model dtype; only the transformer's input is cast.

The generator knows nothing of HTTP, keys or credits: one call, `generate(request)`, and it may
be called from any thread (the weights are read-only; each call has its own noise, sigmas and
state; tokenizers are used under a lock, diffusers issues #3672/#7851).
"""

from __future__ import annotations

import copy
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.img2img import start_latent, to_vae_input
from pipelines.loading import LoadedModel
from pipelines.options import NegativeWindowWiring, PercentRule
from pipelines.prompt_cache import PromptCache
from pipelines.request import GenerationRequest, GenerationResult
from pipelines.step_cache import StepCache, policy_for
from pipelines.text import count_tokens, encode_prompt
from schedulers import denoiser_calls, sample
from schedulers.guidance import CondRange, GuidedDenoiser, guided_denoiser, negative_ranges, plain_negative
from schedulers.noise import initial_noise
from schedulers.samplers import STOCHASTIC

StepCallback = Callable[[int, int], None]

LATENT_CHANNELS = 16
VAE_SCALE = 8


class GenerationError(Exception):
    """The model produced no usable image (e.g. NaNs from an fp16 overflow)."""


@dataclass(frozen=True)
class Conditioning:
    context: torch.Tensor  # [B, L, joint_attention_dim]
    pooled: torch.Tensor  # [B, pooled_projection_dim]


@dataclass(frozen=True, kw_only=True)
class SamplingOptions:
    negative_window_wiring: NegativeWindowWiring = "a"
    percent_rule: PercentRule = "current"
    max_sequence_length: int = 77
    prompt_cache_bytes: int = 256 * 2**20


def batch_key(request: GenerationRequest) -> tuple[object, ...] | None:
    """Requests with equal keys can share one sampling batch; None: this one always runs alone.

    Everything that shapes the sigma schedule, the negative window or the latent size must agree.
    Stochastic samplers are excluded: their per-step noise is drawn for the whole batch at once
    (docs/sampling.md §7), so a neighbour in the batch would change a request's image. img2img jobs
    batch with each other (each keeps its own image's latent), never with txt2img.
    """
    spec = request.sampling_spec()
    if spec.sampler in STOCHASTIC:
        return None
    return (
        request.init_image is not None,
        spec.sampler,
        spec.schedule,
        spec.guidance_factor,
        request.steps,
        request.shift,
        request.denoise,
        request.guidance_scale,
        request.cond_start,
        request.cond_stop,
        request.negative_window,
        request.width,
        request.height,
        request.step_cache,
    )


class SD3Generator:
    def __init__(
        self, model: LoadedModel, options: SamplingOptions | None = None, *, t5_on_cpu: bool = False
    ) -> None:
        self.model = model
        # The memory plan may keep T5 on the CPU (pipelines.memory): it then runs there.
        self.t5_device = torch.device("cpu") if t5_on_cpu else None
        self.pipe = model.pipe
        self.options = options or SamplingOptions()
        self._tokenizer_lock = threading.Lock()
        self._has_t5 = self.pipe.text_encoder_3 is not None
        self.latent_channels = self.pipe.transformer.config.in_channels
        self.prompt_cache = PromptCache(self.options.prompt_cache_bytes)
        # Counting has its own tokenizer copy and lock: a request's count must not wait for another
        # request's encode, which holds the encoding lock through the text encoders' forwards.
        self._counting_tokenizer = copy.deepcopy(self.pipe.tokenizer)
        self._counting_lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- text -------------------------------------------------------------------------------
    def encode(self, text: str, *, scope: str = "") -> Conditioning:
        """The SD3 conditioning of one prompt (cached: the same text in the same scope is encoded once).

        The empty prompt (every default negative) is shared across scopes: that it was used recently
        says nothing about anyone.
        """
        key = (scope if text else "", text, self._has_t5, self.options.max_sequence_length)
        return self.prompt_cache.get_or_compute(key, lambda: self._encode_uncached(text))

    def count_tokens(self, text: str) -> int:
        """CLIP tokens of a prompt as encoding splits it (weights syntax excluded), from any thread.

        CLIP-L's tokenizer: SD3's two CLIP tokenizers share one vocabulary, and the CLIP count is
        the one that multiplies 77-token chunks through both CLIP encoders.
        """
        with self._counting_lock:
            return count_tokens(self._counting_tokenizer, text)

    def _encode_uncached(self, text: str) -> Conditioning:
        # ComfyUI's text conditioning (chunked CLIP, untruncated T5, "(word:1.2)" weights;
        # docs/sampling.md §8).
        # The tokenizers are not thread-safe (diffusers #3672), hence the lock.
        with self._tokenizer_lock:
            context, pooled = encode_prompt(
                self.pipe,
                text,
                device=self.device,
                dtype=self.pipe.text_encoder.dtype,
                t5_min_length=self.options.max_sequence_length,
                t5_device=self.t5_device,
            )
        return Conditioning(context, pooled)

    # -- the model as a denoiser ------------------------------------------------------------
    def _velocity(
        self,
        x: torch.Tensor,
        sigma: float,
        cond: Conditioning,
        *,
        cache: StepCache | None = None,
        key: tuple[str, ...] = (),
    ) -> torch.Tensor:
        """One transformer forward: v(x, 1000σ), computed on an even-sized latent; through the step
        cache when the request opted in (`key` names the conditionings stacked in `cond`)."""
        transformer = self.pipe.transformer
        h, w = x.shape[-2:]
        # SD3 patches 2x2, the API allows multiples of 8 px: pad an odd latent side circularly and
        # crop the output back, as ComfyUI does (docs/sampling.md §8).
        pad_h, pad_w = h % 2, w % 2
        x_in = F.pad(x, (0, pad_w, 0, pad_h), mode="circular") if pad_h or pad_w else x
        timestep = torch.full((x.shape[0],), 1000.0 * sigma, dtype=torch.float32, device=x.device)
        inputs = {
            "hidden_states": x_in.to(self.model.dtype),
            "timestep": timestep,
            "encoder_hidden_states": cond.context,
            "pooled_projections": cond.pooled,
        }
        if cache is None:
            v = transformer(**inputs, return_dict=False)[0]
        else:
            v = cache.forward(transformer, key, **inputs)
        return v[..., :h, :w].float()

    def _predictor(
        self, conds: dict[str, Conditioning], *, cache: StepCache | None = None
    ) -> Callable[[torch.Tensor, float, tuple[str, ...]], list[torch.Tensor]]:
        def predict(x: torch.Tensor, sigma: float, names: tuple[str, ...]) -> list[torch.Tensor]:
            denoised: dict[str, torch.Tensor] = {}
            for group in _forward_groups({n: conds[n] for n in names}):
                stacked = _cat(list(group.values()))
                x_in = x.repeat(len(group), 1, 1, 1)
                v = self._velocity(x_in, sigma, stacked, cache=cache, key=tuple(group))
                d = x_in - sigma * v  # CONST: D = x − σ·v
                denoised.update(zip(group, d.split(x.shape[0]), strict=True))
            return [denoised[name] for name in names]

        return predict

    # -- jobs -------------------------------------------------------------------------------
    def generate(
        self, request: GenerationRequest, *, callback: StepCallback | None = None
    ) -> GenerationResult:
        return self.generate_batch([request], callback=callback)[0]

    @torch.inference_mode()
    def generate_batch(
        self, requests: list[GenerationRequest], *, callback: StepCallback | None = None
    ) -> list[GenerationResult]:
        """Generate several requests with equal `batch_key` in one sampling batch.

        Each request keeps its own prompt, negative prompt, seed and sample count: its noise is
        drawn from its own seed for its own samples, so it gets the images it would get alone (up to
        the float rounding of a larger batch). The phases are those of docs/sampling.md §9.
        """
        _check_batch(requests)
        t0 = time.perf_counter()

        # 1. Conditionings: positive, negative and the zeroed-out negative, one row per sample.
        conds = self._conditionings(requests)
        if conds is None:
            # Prompts of different token lengths cannot be stacked: run them one after the other.
            return [result for r in requests for result in self.generate_batch([r], callback=callback)]
        t1 = time.perf_counter()

        # 2.-3. Sigmas, initial latents and sampling.
        x, cache = self._denoise(requests, conds, callback=callback)
        t2 = time.perf_counter()

        # 4. Decode.
        images = self.decode(_finite(x))
        t3 = time.perf_counter()

        # 5. Results: each request's own images, in order.
        timings = {"encode": t1 - t0, "sample": t2 - t1, "decode": t3 - t2, "batch": float(len(requests))}
        if cache is not None:
            timings["cache_skipped"] = cache.skipped_share
        return _results(requests, images, timings)

    @torch.inference_mode()
    def sample_latents(self, requests: list[GenerationRequest]) -> torch.Tensor:
        """The latents `generate_batch` would decode, one row per sample: what a step distillation
        teaches a student to reach from the same noise (pipelines/toy/distill.py).

        The requests must share a batch key and their prompts one token length.
        """
        _check_batch(requests)
        conds = self._conditionings(requests)
        if conds is None:
            raise ValueError("prompts of different token lengths cannot share a batch")
        return self._denoise(requests, conds, callback=None)[0]

    @torch.inference_mode()
    def sample_trajectory(self, requests: list[GenerationRequest], stops: Sequence[float]) -> torch.Tensor:
        """The latents the requests' sampling passes through at each σ of `stops`, stacked on a new
        dim 1 in the order given: what a phased step distillation teaches a student to step between
        (pipelines/toy/distill.py). σ = 0 is the final latent.

        The stops are merged into the request's own schedule, so the sampler steps onto each of them;
        a stop already in it (to float rounding) changes nothing. Only for a sampler that calls the
        model once a step, at the step's own σ (Euler, DPM++ 2M, ...): the state a step starts from is
        then the one the model sees, and no stage of a step in between is mistaken for it.
        """
        _check_batch(requests)
        first = requests[0]
        spec = first.sampling_spec()
        wanted = torch.tensor(list(stops), dtype=torch.float32)
        schedule = first.sigmas()
        if first.init_image is not None or len(schedule) < 2 or wanted.numel() == 0:
            raise ValueError("a trajectory is of a txt2img request with steps, at one stop or more")
        # A stop that is one of the schedule's σ's up to float rounding (another step count's schedule
        # computes some of the same σ's in another order) is that σ. Added as a second point a few ulp
        # away, it would make a step of nearly nothing, and a multistep sampler's next extrapolation
        # divides by that step: DPM++ 2M's then amplifies rounding into a visible error.
        nearest = (wanted[:, None] - schedule[None, :]).abs().argmin(dim=1)
        close = torch.isclose(wanted, schedule[nearest], rtol=1e-5, atol=1e-7)
        wanted = torch.where(close, schedule[nearest], wanted)
        sigmas = torch.unique(torch.cat([schedule, wanted])).flip(0)
        low, high = float(schedule[-1]), float(schedule[0])
        if not (low <= float(wanted.min()) and float(wanted.max()) <= high):
            raise ValueError(f"the stops must lie within the schedule's σ range, {low} to {high}")
        if denoiser_calls(spec.sampler, tuple(float(s) for s in sigmas)) != len(sigmas) - 1:
            raise ValueError(f"sampler {spec.sampler!r} does not call the model once a step")
        conds = self._conditionings(requests)
        if conds is None:
            raise ValueError("prompts of different token lengths cannot share a batch")
        guided = self._guided(first, conds)
        states: list[torch.Tensor] = []

        def observed(x: torch.Tensor, sigma: float) -> torch.Tensor:
            states.append(x.clone())
            return guided(x, sigma)

        x = self._initial_latents(requests, sigmas)
        states.append(
            sample(spec.sampler, observed, x, sigmas.to(self.device), seed=first.seed, shift=first.shift)
        )
        index = {float(s): i for i, s in enumerate(sigmas)}
        return torch.stack([states[index[float(s)]] for s in wanted], dim=1)

    def _denoise(
        self,
        requests: list[GenerationRequest],
        conds: dict[str, Conditioning],
        *,
        callback: StepCallback | None,
    ) -> tuple[torch.Tensor, StepCache | None]:
        """Sigmas, initial latents, and the guided denoiser driven down them by the stateless sampler."""
        first = requests[0]
        sigmas = first.sigmas().to(self.device)
        x = self._initial_latents(requests, sigmas)
        policy = policy_for(first.step_cache)
        cache = StepCache(policy) if policy is not None else None
        # An img2img strength of 0 leaves no sigmas: the image latent is decoded as it is (a VAE round trip).
        if len(sigmas) > 1:
            x = self._sample(first, conds, x, sigmas, cache=cache, callback=callback)
        elif callback is not None:
            callback(0, 0)  # the job still starts (and may still be cancelled) as any other
        return x, cache

    def _conditionings(self, requests: list[GenerationRequest]) -> dict[str, Conditioning] | None:
        """The named conditionings of a batch, stacked over its samples; None if they cannot stack."""
        positives = [_repeat(self.encode(r.prompt, scope=r.cache_scope), r.samples) for r in requests]
        negatives = [
            _repeat(self.encode(r.negative_prompt, scope=r.cache_scope), r.samples) for r in requests
        ]
        if (
            len({c.context.shape[1] for c in positives}) > 1
            or len({c.context.shape[1] for c in negatives}) > 1
        ):
            return None
        negative = _cat(negatives)
        return {
            "positive": _cat(positives),
            "negative": negative,
            # ConditioningZeroOut: a real model call with all-zero context and pooled vector
            # (docs/sampling.md §5.1).
            "zero": Conditioning(torch.zeros_like(negative.context), torch.zeros_like(negative.pooled)),
        }

    def _initial_latents(self, requests: list[GenerationRequest], sigmas: torch.Tensor) -> torch.Tensor:
        first = requests[0]
        if first.init_image is not None:
            return self._image_latents(requests, sigmas)
        h, w = first.height // VAE_SCALE, first.width // VAE_SCALE
        # One randn per request over its own samples, exactly as a lone request draws it
        # (docs/sampling.md §7).
        noise = torch.cat(
            [initial_noise(r.seed, (r.samples, self.latent_channels, h, w)) for r in requests]
        ).to(self.device)
        # The empty latent is zero and is not shifted (docs/sampling.md §6), so x_start = σ0·noise.
        return float(sigmas[0]) * noise

    def _image_latents(self, requests: list[GenerationRequest], sigmas: torch.Tensor) -> torch.Tensor:
        """img2img's start: each request's image latent, repeated over its samples and noised to σ0."""
        starts = []
        for r in requests:
            assert r.init_image is not None
            latent = self.encode_image(r.init_image)
            if latent.shape[-2:] != (r.height // VAE_SCALE, r.width // VAE_SCALE):
                raise ValueError(
                    f"the request's size {r.width}x{r.height} is not its image's cropped size "
                    f"{latent.shape[-1] * VAE_SCALE}x{latent.shape[-2] * VAE_SCALE}"
                )
            latent = latent.repeat(r.samples, 1, 1, 1)
            if len(sigmas) < 2:
                starts.append(latent)
                continue
            # The same CPU draw as txt2img, one randn over the request's samples (docs/sampling.md §7).
            noise = initial_noise(r.seed, tuple(latent.shape)).to(self.device)
            starts.append(start_latent(latent=latent, noise=noise, sigma=float(sigmas[0])))
        return torch.cat(starts)

    def encode_image(self, image: np.ndarray) -> torch.Tensor:
        """An HxWx3 uint8 image → its [1, C, h, w] float32 latent in the sampler's (scaled) space.

        The crop to the 8 px grid and the posterior mode, as docs/sampling.md (img2img) says; then
        SD3's (z − shift)·scaling, the inverse of what `decode` undoes.
        """
        vae = self.pipe.vae
        pixels = to_vae_input(image).to(device=self.device, dtype=vae.dtype)
        posterior = vae.encode(pixels, return_dict=False)[0]
        z = posterior.mode().float()
        return (z - vae.config.shift_factor) * vae.config.scaling_factor

    def _sample(
        self,
        request: GenerationRequest,
        conds: dict[str, Conditioning],
        x: torch.Tensor,
        sigmas: torch.Tensor,
        *,
        cache: StepCache | None = None,
        callback: StepCallback | None,
    ) -> torch.Tensor:
        """Run the request's sampler from `x` at sigmas[0]; `request` carries the batch's shared settings."""
        x = sample(
            request.sampling_spec().sampler,
            self._guided(request, conds, cache=cache),
            x,
            sigmas,
            seed=request.seed,
            shift=request.shift,
            callback=callback,
        )
        # inverse_noise_scaling: identity for the usual last σ = 0 (docs/sampling.md §1).
        last = float(sigmas[-1])
        if last > 0:
            x = x / (1.0 - last)
        return x

    def _guided(
        self, request: GenerationRequest, conds: dict[str, Conditioning], *, cache: StepCache | None = None
    ) -> GuidedDenoiser:
        return guided_denoiser(
            self._predictor(conds, cache=cache),
            # The `_pp` spellings run their plain sampler at twice the guidance (schedulers/names.py).
            cfg=request.guidance_scale * request.sampling_spec().guidance_factor,
            ranges=self.negative_ranges(request),
        )

    def negative_ranges(self, request: GenerationRequest) -> tuple[CondRange, ...]:
        """Where in σ the request's negative prompt and the zeroed-out negative guide its sampling."""
        if not request.negative_window:
            return plain_negative()
        return negative_ranges(
            start=request.cond_start,
            stop=request.cond_stop,
            shift=request.shift,
            wiring=self.options.negative_window_wiring,
            rule=self.options.percent_rule,
        )

    def decode(self, latents: torch.Tensor) -> list[np.ndarray]:
        vae = self.pipe.vae
        scaling, shift = vae.config.scaling_factor, vae.config.shift_factor
        images = []
        # One image at a time: the VAE decode is the memory peak of a batch (docs/performance.md §5).
        for latent in latents.split(1):
            z = (latent / scaling + shift).to(vae.dtype)
            pixels = vae.decode(z, return_dict=False)[0].float()
            # ComfyUI: clamp((img + 1) / 2) then truncate (not round) to uint8 (docs/sampling.md §9).
            pixels = ((pixels + 1.0) / 2.0).clamp(0.0, 1.0)
            array = (255.0 * pixels[0].permute(1, 2, 0)).to(torch.uint8).cpu().numpy()
            images.append(array)
        return images


def _check_batch(requests: list[GenerationRequest]) -> None:
    first = requests[0]
    if len(requests) > 1 and any(batch_key(r) != batch_key(first) or batch_key(r) is None for r in requests):
        raise ValueError("requests with different batch keys cannot share a batch")


def _finite(latents: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(latents).all():
        raise GenerationError(
            "The model produced NaN/inf latents (an fp16 overflow?): try --dtype bf16 or fp32."
        )
    return latents


def _results(
    requests: list[GenerationRequest], images: list[np.ndarray], timings: dict[str, float]
) -> list[GenerationResult]:
    """Hand each request its own samples, in the order the batch stacked them."""
    results, offset = [], 0
    for r in requests:
        images_of_r = images[offset : offset + r.samples]
        results.append(GenerationResult(images=images_of_r, seed=r.seed, timings=timings))
        offset += r.samples
    return results


def _repeat(cond: Conditioning, batch: int) -> Conditioning:
    return Conditioning(cond.context.repeat(batch, 1, 1), cond.pooled.repeat(batch, 1))


def _cat(conds: list[Conditioning]) -> Conditioning:
    return Conditioning(torch.cat([c.context for c in conds]), torch.cat([c.pooled for c in conds]))


def _forward_groups(conds: dict[str, Conditioning]) -> list[dict[str, Conditioning]]:
    """Split one evaluation's conditionings into transformer forwards, as ComfyUI batches them.

    Equal context lengths share one forward. Different lengths (a long prompt beside a short
    negative) share one too when the least common multiple is at most 4x the shortest: each
    context is then repeated along the sequence up to that length, exactly as ComfyUI does — which
    is not a no-op for SD3's joint attention, so it matters for parity. Otherwise each length runs
    in a forward of its own.
    """
    lengths = {name: cond.context.shape[1] for name, cond in conds.items()}
    if len(set(lengths.values())) == 1:
        return [conds]
    target = math.lcm(*lengths.values())
    if target <= 4 * min(lengths.values()):
        return [
            {
                name: Conditioning(cond.context.repeat(1, target // lengths[name], 1), cond.pooled)
                for name, cond in conds.items()
            }
        ]
    by_length: dict[int, dict[str, Conditioning]] = {}
    for name, cond in conds.items():
        by_length.setdefault(lengths[name], {})[name] = cond
    return list(by_length.values())
