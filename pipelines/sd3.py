"""The generator: prompt encoding, the ComfyUI-math denoising loop of sampling.md §8, VAE decode.

diffusers provides the components (text encoders, `SD3Transformer2DModel`, VAE); the loop is our
own, because the hosted API's parameters are ComfyUI's and stock diffusers schedulers reproduce
only a few of them (sampling.md, Decisions 1). The sampler state stays float32 whatever the
model dtype; only the transformer's input is cast.

The generator knows nothing of HTTP, keys or credits: one call, `generate(request)`, and it may
be called from any thread (the weights are read-only; each call has its own noise, sigmas and
state; tokenizers are used under a lock, diffusers issues #3672/#7851).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.loading import LoadedModel
from pipelines.request import GenerationRequest, GenerationResult
from schedulers import sample, sigmas_for
from schedulers.guidance import guided_denoiser, negative_ranges
from schedulers.names import resolve
from schedulers.noise import initial_noise

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
    negative_window_wiring: str = "a"
    percent_rule: str = "current"
    max_sequence_length: int = 77


class SD3Generator:
    def __init__(self, model: LoadedModel, options: SamplingOptions | None = None) -> None:
        self.model = model
        self.pipe = model.pipe
        self.options = options or SamplingOptions()
        self._tokenizer_lock = threading.Lock()
        self._has_t5 = self.pipe.text_encoder_3 is not None
        self.latent_channels = self.pipe.transformer.config.in_channels

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- text -------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, prompt: str, negative_prompt: str) -> tuple[Conditioning, Conditioning]:
        with self._tokenizer_lock:
            ctx, neg_ctx, pooled, neg_pooled = self.pipe.encode_prompt(
                prompt=prompt,
                prompt_2=None,
                prompt_3=None,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=True,
                negative_prompt=negative_prompt,
                max_sequence_length=self.options.max_sequence_length,
            )
        if not self._has_t5:
            # Without T5 diffusers appends zero tokens; SD3 (ComfyUI) has no T5 part at all (§7).
            ctx, neg_ctx = ctx[:, :77], neg_ctx[:, :77]
        return Conditioning(ctx, pooled), Conditioning(neg_ctx, neg_pooled)

    # -- the model as a denoiser ------------------------------------------------------------
    def _velocity(self, x: torch.Tensor, sigma: float, cond: Conditioning) -> torch.Tensor:
        """One transformer forward: v(x, 1000σ), computed on an even-sized latent."""
        transformer = self.pipe.transformer
        h, w = x.shape[-2:]
        # SD3 patches 2x2, the API allows multiples of 8 px: pad an odd latent side circularly and
        # crop the output back, as ComfyUI does (sampling.md §7).
        pad_h, pad_w = h % 2, w % 2
        x_in = F.pad(x, (0, pad_w, 0, pad_h), mode="circular") if pad_h or pad_w else x
        timestep = torch.full((x.shape[0],), 1000.0 * sigma, dtype=torch.float32, device=x.device)
        v = transformer(
            hidden_states=x_in.to(self.model.dtype),
            timestep=timestep,
            encoder_hidden_states=cond.context,
            pooled_projections=cond.pooled,
            return_dict=False,
        )[0]
        return v[..., :h, :w].float()

    def _predictor(
        self, conds: dict[str, Conditioning]
    ) -> Callable[[torch.Tensor, float, tuple[str, ...]], list[torch.Tensor]]:
        def predict(x: torch.Tensor, sigma: float, names: tuple[str, ...]) -> list[torch.Tensor]:
            batch = x.shape[0]
            # All conditionings of one evaluation run as one forward, as ComfyUI batches cond/uncond.
            stacked = Conditioning(
                torch.cat([conds[n].context for n in names]), torch.cat([conds[n].pooled for n in names])
            )
            v = self._velocity(x.repeat(len(names), 1, 1, 1), sigma, stacked)
            denoised = x.repeat(len(names), 1, 1, 1) - sigma * v  # CONST: D = x − σ·v
            return list(denoised.split(batch))

        return predict

    # -- one job ----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self, request: GenerationRequest, *, callback: StepCallback | None = None
    ) -> GenerationResult:
        spec = resolve(request.scheduler)
        t0 = time.perf_counter()
        positive, negative = self.encode(request.prompt, request.negative_prompt)
        batch = request.samples
        conds = {
            "positive": _repeat(positive, batch),
            "negative": _repeat(negative, batch),
            # ConditioningZeroOut: a real model call with all-zero context and pooled vector (§4.1).
            "zero": _repeat(
                Conditioning(torch.zeros_like(negative.context), torch.zeros_like(negative.pooled)), batch
            ),
        }
        t1 = time.perf_counter()

        sigmas = sigmas_for(
            spec.schedule, request.steps, shift=request.shift, denoise=request.denoise, sampler=spec.sampler
        ).to(self.device)
        h, w = request.height // VAE_SCALE, request.width // VAE_SCALE
        noise = initial_noise(request.seed, (batch, self.latent_channels, h, w)).to(self.device)
        # The empty latent is zero and is not shifted (§5), so x_start = σ0·noise.
        x = float(sigmas[0]) * noise
        denoiser = guided_denoiser(
            self._predictor(conds),
            cfg=request.guidance_scale,
            ranges=negative_ranges(
                start=request.cond_start,
                stop=request.cond_stop,
                shift=request.shift,
                wiring=self.options.negative_window_wiring,
                rule=self.options.percent_rule,
            ),
        )
        x = sample(
            spec.sampler, denoiser, x, sigmas, seed=request.seed, shift=request.shift, callback=callback
        )
        # inverse_noise_scaling: identity for the usual last σ = 0 (§1).
        last = float(sigmas[-1])
        if last > 0:
            x = x / (1.0 - last)
        t2 = time.perf_counter()

        if not torch.isfinite(x).all():
            raise GenerationError(
                "The model produced NaN/inf latents (an fp16 overflow?): try --dtype bf16 or fp32."
            )
        images = self.decode(x)
        t3 = time.perf_counter()
        return GenerationResult(
            images=images,
            seed=request.seed,
            timings={"encode": t1 - t0, "sample": t2 - t1, "decode": t3 - t2},
        )

    def decode(self, latents: torch.Tensor) -> list[np.ndarray]:
        vae = self.pipe.vae
        scaling, shift = vae.config.scaling_factor, vae.config.shift_factor
        images = []
        # One image at a time: the VAE decode is the memory peak of a batch (performance.md §4.1).
        for latent in latents.split(1):
            z = (latent / scaling + shift).to(vae.dtype)
            pixels = vae.decode(z, return_dict=False)[0].float()
            # ComfyUI: clamp((img + 1) / 2) then truncate (not round) to uint8 (Decisions 7).
            pixels = ((pixels + 1.0) / 2.0).clamp(0.0, 1.0)
            array = (255.0 * pixels[0].permute(1, 2, 0)).to(torch.uint8).cpu().numpy()
            images.append(array)
        return images


def _repeat(cond: Conditioning, batch: int) -> Conditioning:
    return Conditioning(cond.context.repeat(batch, 1, 1), cond.pooled.repeat(batch, 1))

