"""The SD3 Medium architecture kept in the project, and a random-weight pipeline built from it.

Benchmarks need the real shapes (the latency and peak memory of each mode depend on nothing
else) but not the real weights, which are gated and 15 GB. So the configs of the five components
of `stabilityai/stable-diffusion-3-medium-diffusers` are written down here as data, and
`build_random_pipeline` instantiates the same diffusers/transformers classes with random weights,
directly on the target device and in the target dtype:

    build_random_pipeline("full", device="cuda", dtype=torch.float16)   # SD3 Medium, 7.7 B parameters
    build_random_pipeline("small", device="cpu", dtype=torch.float32)   # same structure, CPU-sized

The server reaches them as `--model random:sd3-medium` and `--model random:small`
(`pipelines.loading`). Parameter counts of the full configs, counted on the meta device, are those
of docs/performance.md §1: transformer 2.028 B, T5-XXL encoder 4.762 B, CLIP-G 0.695 B, CLIP-L 0.124 B,
VAE 0.084 B (tests/pipelines/test_architectures.py holds them to that).

The tokenizers are the tiny model's offline ones (`pipelines.tiny`): their ids are all below the
real vocabulary sizes, so every prompt is a valid input; only the *split* of a prompt into tokens
differs from CLIP's and T5's, which changes neither shapes nor cost.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

# "full"/"small" are SD3 Medium and its CPU-sized twin (their names predate SD3.5); each SD3.5 model has
# its full size and a "-small" twin of the same structure.
Scale = Literal["full", "small", "sd3.5-large", "sd3.5-large-small", "sd3.5-medium", "sd3.5-medium-small"]


@dataclass(frozen=True)
class SD3Architecture:
    """The constructor arguments of each SD3 component, as in a diffusers folder's config files."""

    transformer: Mapping[str, Any]  # SD3Transformer2DModel
    vae: Mapping[str, Any]  # AutoencoderKL
    clip_l: Mapping[str, Any]  # CLIPTextConfig of text_encoder (CLIPTextModelWithProjection)
    clip_g: Mapping[str, Any]  # CLIPTextConfig of text_encoder_2
    t5: Mapping[str, Any]  # T5Config of text_encoder_3 (T5EncoderModel)
    scheduler: Mapping[str, Any] = field(
        default_factory=lambda: {"num_train_timesteps": 1000, "shift": 3.0}  # FlowMatchEulerDiscreteScheduler
    )

    def check(self) -> None:
        """The couplings between components that a hand-edited config could break."""
        tr, clip_l, clip_g = self.transformer, self.clip_l, self.clip_g
        problems = []
        if tr["joint_attention_dim"] != self.t5["d_model"]:
            problems.append("the transformer's joint_attention_dim must equal T5's d_model")
        if tr["joint_attention_dim"] < clip_l["hidden_size"] + clip_g["hidden_size"]:
            problems.append("CLIP-L + CLIP-G hidden states are zero-padded to joint_attention_dim: must fit")
        if tr["pooled_projection_dim"] != clip_l["projection_dim"] + clip_g["projection_dim"]:
            problems.append("pooled_projection_dim must equal the two CLIP projection widths together")
        if clip_l["projection_dim"] != clip_l["hidden_size"]:
            problems.append("SD3's CLIP-L projection is the identity, so it must be square")
        if tr["caption_projection_dim"] != tr["num_attention_heads"] * tr["attention_head_dim"]:
            problems.append("caption_projection_dim must equal heads x head dim (the joint attention width)")
        if tr["in_channels"] != self.vae["latent_channels"]:
            problems.append("the transformer's in_channels must equal the VAE's latent_channels")
        if problems:
            raise ValueError("; ".join(problems))


# stabilityai/stable-diffusion-3-medium-diffusers, the configs of each subfolder (ids and defaults that
# do not change a shape are left to the classes' defaults).
SD3_MEDIUM = SD3Architecture(
    transformer={
        "sample_size": 128,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": 24,
        "attention_head_dim": 64,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "caption_projection_dim": 1536,
        "pooled_projection_dim": 2048,
        "out_channels": 16,
        "pos_embed_max_size": 192,
    },
    vae={
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 16,
        "norm_num_groups": 32,
        "sample_size": 1024,
        "scaling_factor": 1.5305,
        "shift_factor": 0.0609,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "force_upcast": True,
    },
    clip_l={
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        # The released config keeps CLIP's old eos id 2, which makes transformers pool at the
        # largest token id: the end-of-text token, in the real vocabulary and in the tiny one.
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    },
    clip_g={
        "vocab_size": 49408,
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 20,
        "max_position_embeddings": 77,
        "projection_dim": 1280,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    },
    t5={  # T5 v1.1 XXL, encoder only
        "vocab_size": 32128,
        "d_model": 4096,
        "d_kv": 64,
        "d_ff": 10240,
        "num_layers": 24,
        "num_heads": 64,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "feed_forward_proj": "gated-gelu",
        "layer_norm_epsilon": 1e-6,
        "dropout_rate": 0.1,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    },
)


def _narrow(base: Mapping[str, Any], **changes: Any) -> dict[str, Any]:
    return {**base, **changes}


# The same five classes with every option that decides the *structure* kept (activations, the
# last block's context_pre_only, quick_gelu vs gelu, gated-gelu T5, four VAE levels with two
# resnets each, the real vocabularies and the 192-patch position table) and only widths and
# depths cut, so that it runs on a CPU in seconds and exercises the same code as full size.
SD3_SMALL = SD3Architecture(
    transformer=_narrow(
        SD3_MEDIUM.transformer,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=96,
        caption_projection_dim=32,
        pooled_projection_dim=32 + 48,
    ),
    vae=_narrow(SD3_MEDIUM.vae, block_out_channels=(16, 32, 32, 32), norm_num_groups=8),
    clip_l=_narrow(
        SD3_MEDIUM.clip_l,
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=32,
    ),
    clip_g=_narrow(
        SD3_MEDIUM.clip_g,
        hidden_size=48,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=48,
    ),
    t5=_narrow(SD3_MEDIUM.t5, d_model=96, d_kv=16, d_ff=192, num_layers=2, num_heads=4),
)

# SD3.5 keeps SD3 Medium's text encoders, VAE and scheduler and changes only the transformer
# (stabilityai/stable-diffusion-3.5-large and -medium, transformer/config.json): RMS-normalised queries
# and keys in every attention (`qk_norm`), Large 38 blocks of 38 heads, Medium 24 blocks whose first 13
# add a second, image-only attention (MMDiT-X, `dual_attention_layers`) over a 384-patch position table.
# Large Turbo is Large's architecture with distilled weights.
SD35_LARGE = dataclasses.replace(
    SD3_MEDIUM,
    transformer=_narrow(
        SD3_MEDIUM.transformer,
        num_layers=38,
        num_attention_heads=38,
        caption_projection_dim=38 * 64,
        qk_norm="rms_norm",
    ),
)
SD35_MEDIUM = dataclasses.replace(
    SD3_MEDIUM,
    transformer=_narrow(
        SD3_MEDIUM.transformer,
        qk_norm="rms_norm",
        dual_attention_layers=tuple(range(13)),
        pos_embed_max_size=384,
    ),
)
# Their CPU-sized twins: SD3_SMALL's widths with the SD3.5 structure (qk-norm; dual attention in the
# first of the two blocks, as Medium has it in its first half).
SD35_LARGE_SMALL = dataclasses.replace(
    SD3_SMALL, transformer=_narrow(SD3_SMALL.transformer, qk_norm="rms_norm")
)
SD35_MEDIUM_SMALL = dataclasses.replace(
    SD3_SMALL,
    transformer=_narrow(
        SD3_SMALL.transformer, qk_norm="rms_norm", dual_attention_layers=(0,), pos_embed_max_size=384
    ),
)

ARCHITECTURES: dict[Scale, SD3Architecture] = {
    "full": SD3_MEDIUM,
    "small": SD3_SMALL,
    "sd3.5-large": SD35_LARGE,
    "sd3.5-large-small": SD35_LARGE_SMALL,
    "sd3.5-medium": SD35_MEDIUM,
    "sd3.5-medium-small": SD35_MEDIUM_SMALL,
}


@contextlib.contextmanager
def _creating_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """New tensors land on `device` in `dtype` while inside: weights are born where they will live.

    Initialising 7.6 B parameters on a CPU is slow (on a 2-core box: 46 s for everything but T5,
    101 s for T5); on the GPU the same initialisers run as device kernels. Creating in the target
    dtype avoids a transient fp32 copy (19 GB for T5 alone) that would not fit the cards the
    benchmarks are meant for. Buffers computed at init (the transformer's sin-cos position table)
    come out right, which meta + `to_empty` would not give. The default dtype is process-wide, so
    this belongs at start-up, before other threads create tensors.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


def _keep_fp32_where_transformers_does(model: Any, dtype: torch.dtype) -> None:
    """Upcast the modules a real fp16 load keeps in fp32 (T5's `wo`), so memory matches a real load."""
    names = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype != torch.float16 or not names:
        return
    for name, module in model.named_modules():
        if names & set(name.split(".")):
            module.to(torch.float32)


def _buffers_to(model: Any, dtype: torch.dtype) -> Any:
    """Cast floating buffers diffusers computes in fp32 whatever the default (the position table).

    A model loaded in fp16 holds them in fp16, and the memory should match. Only buffers: the
    parameters were created in `dtype` already, and `model.to(dtype)` would log a warning meant for
    models with modules kept in fp32.
    """
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != dtype:
                setattr(module, name, buffer.to(dtype))
    return model


def build_t5(arch: SD3Architecture, *, device: torch.device | str, dtype: torch.dtype) -> Any:
    """`arch`'s T5 encoder alone, with random weights, on `device` in `dtype` (as `build_components`)."""
    with _creating_on(torch.device(device), dtype):
        return _t5(arch, dtype)


def _t5(arch: SD3Architecture, dtype: torch.dtype) -> Any:
    from transformers import T5Config, T5EncoderModel

    t5 = T5EncoderModel._from_config(T5Config(**arch.t5), dtype=dtype).eval()
    _keep_fp32_where_transformers_does(t5, dtype)
    return t5


def build_components(
    arch: SD3Architecture, *, device: torch.device | str, dtype: torch.dtype, with_t5: bool = True
) -> dict[str, Any]:
    """The five models of `arch` with random weights, on `device` in `dtype` ("meta" counts for free)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    arch.check()
    device = torch.device(device)
    models: dict[str, Any] = {}
    with _creating_on(device, dtype):
        models["transformer"] = _buffers_to(SD3Transformer2DModel(**arch.transformer), dtype).eval()
        models["vae"] = _buffers_to(AutoencoderKL(**arch.vae), dtype).eval()
        clip_l = CLIPTextModelWithProjection._from_config(CLIPTextConfig(**arch.clip_l), dtype=dtype).eval()
        models["text_encoder"] = clip_l
        clip_g = CLIPTextModelWithProjection._from_config(CLIPTextConfig(**arch.clip_g), dtype=dtype).eval()
        models["text_encoder_2"] = clip_g
        models["text_encoder_3"] = _t5(arch, dtype) if with_t5 else None
    projection = clip_l.text_projection.weight
    if not projection.is_meta:
        with torch.no_grad():
            # SD3 pools CLIP-L un-projected (docs/sampling.md §8); a random matrix would be a different model.
            projection.copy_(torch.eye(projection.shape[0], dtype=projection.dtype, device=projection.device))
    return models


def parameter_counts(scale: Scale = "full") -> dict[str, int]:
    """Parameters per component, counted on the meta device (no memory; about a second)."""
    models = build_components(ARCHITECTURES[scale], device="meta", dtype=torch.bfloat16)
    return {name: sum(p.numel() for p in m.parameters()) for name, m in models.items() if m is not None}


def build_random_pipeline(
    scale: Scale = "full",
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    with_t5: bool = True,
    seed: int = 0,
) -> Any:
    """A `StableDiffusion3Pipeline` of the `scale` architecture with random weights from `seed`.

    The weights are drawn by each class's own initialiser, so activations keep the scale each
    model was designed for through its real depth (at full size in bf16 on CPU, the transformer,
    VAE and T5 outputs are finite with unit-order spread). The same seed on the same device gives
    the same model, and the global RNG is left as it was.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from pipelines.tiny import clip_tokenizer, t5_tokenizer

    if scale not in ARCHITECTURES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[scale]
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        models = build_components(arch, device=device, dtype=dtype, with_t5=with_t5)
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**arch.scheduler),
        tokenizer=clip_tokenizer(pad_token="<|endoftext|>"),  # SD3's CLIP-L pads with end-of-text
        tokenizer_2=clip_tokenizer(pad_token="!"),  # and CLIP-G with "!" (id 0)
        tokenizer_3=t5_tokenizer() if with_t5 else None,
        **models,
    )
