"""The one settings object: every knob of sd3-server, with an `SD3_` environment twin.

Built once (by the CLI or by whoever embeds the app) and passed down; nothing else reads
`os.environ`. Nested groups are set from the environment with a double underscore, e.g.
`SD3_MODEL__DEVICE=cuda`, `SD3_PRICING__PRICE_PER_IMAGE=0.05`. Each field's description is its
help on the command line, where server/flags.py makes it a flag: `--` and the field's own name,
unless `Flags` names it otherwise.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal

import platformdirs
from pydantic import AfterValidator, BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipelines.options import (
    AttentionChoice,
    CompileScope,
    Device,
    Dtype,
    FamilyChoice,
    MemoryMode,
    NegativeWindowWiring,
    PercentRule,
    StepCacheLevel,
    Switch,
    T5Choice,
    TransformerQuant,
)
from server.credits import MAX_CREDITS

DEFAULT_MODEL = "stabilityai/stable-diffusion-3-medium-diffusers"


def _warmup_size(text: str) -> str:
    """ "WIDTHxHEIGHT", or one number for a square, within the API's bounds for `img_width` and
    `img_height`; normalised to "WIDTHxHEIGHT"."""
    width, sep, height = text.strip().lower().partition("x")
    height = height if sep else width
    if not (width.isdigit() and height.isdigit()):
        raise ValueError(f"{text!r} is not WIDTHxHEIGHT (e.g. 1344x768) or one side of a square")
    for side in (int(width), int(height)):
        if not 512 <= side <= 2048 or side % 8:
            raise ValueError(f"{text!r}: each side must be 512-2048 and a multiple of 8, as the API's")
    return f"{int(width)}x{int(height)}"


WarmupSize = Annotated[str, AfterValidator(_warmup_size)]
# In the data folder: the default instance id (see `Settings.instance_id`).
INSTANCE_ID_FILE = "instance-id"


@dataclass(frozen=True, init=False)
class Flags:
    """A setting's command-line names, where they are not `--` and its own name (kept from releases
    that declared them by hand, or told apart from a namesake in another group)."""

    names: tuple[str, ...]

    def __init__(self, *names: str) -> None:
        object.__setattr__(self, "names", names)


@dataclass(frozen=True)
class Shortcut:
    """One more flag that sets the setting to one value (`--no-t5` is `--t5 off`)."""

    flag: str
    value: str
    help: str


def stored_instance_id(data_dir: Path) -> str:
    """The id kept in `data_dir`, made on first use: `<host name>-<16 hex digits>`.

    Created under a temporary name and hard-linked into place, which fails if the file exists: two
    processes starting at once on a new folder agree on the one id that was linked first.
    """
    path = data_dir / INSTANCE_ID_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        made = f"{socket.gethostname()[:64]}-{secrets.token_hex(8)}"
        scratch = data_dir / f".{INSTANCE_ID_FILE}.{secrets.token_hex(4)}"
        scratch.write_text(made + "\n", encoding="utf-8")
        try:
            os.link(scratch, path)
        except FileExistsError:
            pass
        finally:
            scratch.unlink()
    instance_id = path.read_text(encoding="utf-8").strip()
    if not 1 <= len(instance_id) <= 128:
        raise ValueError(
            f"{path} must hold an instance id of 1 to 128 characters: restore it, or set SD3_INSTANCE_ID"
        )
    return instance_id


class ModelSettings(BaseModel):
    # "tiny" (the offline random-weight model), a Hugging Face id, a local diffusers folder,
    # a single-file checkpoint (.safetensors / .ckpt), or "random:sd3-medium" / "random:small"
    # (the real architecture with random weights, for benchmarks without a download).
    id: Annotated[str, Flags("--model", "-m")] = Field(
        DEFAULT_MODEL,
        description="tiny | toy | tiny:<family> | random:sd3-medium | random:small | "
        "random:sd3.5-large | random:sd3.5-medium | Hugging Face id | diffusers folder | .safetensors",
    )
    # SD3.5 Large and Large Turbo share one architecture: only this (or a source naming "turbo")
    # tells them apart (pipelines/families.py).
    family: Annotated[FamilyChoice, Flags("--model-family")] = Field(
        "auto", description="The SD3 family the weights are served as; auto: read from the weights"
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag, commit)")
    # Only for single-file checkpoints: a local diffusers folder (or Hub id) whose configs describe it,
    # so that a checkpoint can be loaded with no network.
    config: Annotated[str | None, Flags("--model-config")] = Field(
        None, description="Diffusers folder/id with the configs of a single-file checkpoint"
    )
    device: Device = Field("auto", description="Where to run; auto: CUDA, else MPS, else the CPU")
    dtype: Dtype = Field(
        "auto",
        description="Weights' precision; auto: fp16 on a GPU, bf16 on a CPU with native bf16, else fp32",
    )
    # Merged into the weights at start-up (pipelines/lora.py): a step-distilled LoRA is the few-step mode.
    lora: list[str] = Field(
        default_factory=list,
        description="LoRA fused into the model at start-up: PATH or PATH:SCALE (default scale 1), repeatable",
    )
    # The user's own token for gated repositories; when unset, huggingface_hub falls back to HF_TOKEN
    # or the token saved by `hf auth login`.
    hf_token: SecretStr | None = Field(
        None, description="Token for gated Hub repositories; unset: HF_TOKEN or `hf auth login`'s"
    )


class SamplingSettings(BaseModel):
    # Which ComfyUI conventions the hosted service follows is not known (docs/sampling.md §5.3, §10):
    # both choices are kept as settings.
    negative_window_wiring: NegativeWindowWiring = Field(
        "a", description="Timestep range of the real negative prompt: a (0-10 %) or b (0-start)"
    )
    percent_rule: PercentRule = Field(
        "current", description="ComfyUI's percent-to-sigma rule: current (since 2024-12) or legacy"
    )
    # ComfyUI pads T5 to 77 tokens; diffusers' default of 256 changes the image.
    max_sequence_length: int = Field(77, ge=1, le=512, description="T5 tokens per prompt")
    # The SD3.5 pages have no negative-window fields; plain CFG on every step is assumed
    # (docs/contract.md §8). "window": the SD3 workflow's window at its defaults (0.1 / 1).
    sd35_negative: Literal["plain", "window"] = Field(
        "plain", description="SD3.5 slugs' negative prompt: plain CFG on every step, or SD3's window"
    )


class MemorySettings(BaseModel):
    # Where the weights live: "auto" picks from the device's free memory (pipelines/memory.py).
    mode: Annotated[MemoryMode, Flags("--memory-mode")] = Field(
        "auto", description="Where the weights live; auto: from the device's free memory"
    )
    # T5-XXL is 11.5 GB in an fp16 load (wo stays fp32): "8bit" (bitsandbytes) saves ~3.6 GB; "off" all but
    # changes the image (the context is then CLIP only). "auto" never drops it.
    t5: Annotated[
        T5Choice, Shortcut("--no-t5", "off", "Same as --t5 off: ~9.5 GB less, a CLIP-only context")
    ] = Field("auto", description="The T5-XXL text encoder; auto never drops it")
    # Keep T5 on the CPU and run it there, out of the GPU plan: an 8 GB card can then keep T5 under
    # model offload; a new prompt is encoded on the CPU (seconds; repeats come from the cache).
    # "auto": only when no plan fits T5 on the GPU.
    t5_on_cpu: Switch = Field("auto", description="Run T5 on the CPU, out of the GPU's plan")
    vae_tiling: Switch = Field("auto", description="Decode latents to images tile by tile")
    attention_slicing: Switch = Field("auto", description="Compute attention a slice at a time")
    # Encoded prompts kept for reuse in MB (docs/performance.md §4 sizes an entry).
    prompt_cache_mb: int = Field(256, ge=0, description="Encoded-prompt cache size, in MB")


class PerformanceSettings(BaseModel):
    # torch.compile of the transformer: faster on big GPUs (docs/performance.md §6) after a compile
    # (cached by inductor across restarts) that the warm-up pays at start-up. Unset: on for a CUDA
    # device holding the weights, off elsewhere (pipelines/compilation.py says why).
    compile: bool | None = Field(None, description="torch.compile the transformer; unset: on CUDA")
    # "blocks": each transformer block compiled in place, one graph for all (seconds to compile, and
    # the step cache runs compiled too); "whole": the transformer as one graph.
    compile_scope: CompileScope = Field("blocks", description="What torch.compile captures")
    compile_mode: str = Field("max-autotune-no-cudagraphs", description="torch.compile's mode")
    compile_backend: str = Field("inductor", description="torch.compile's backend")
    # The transformer's linear layers in int8 or fp8 (torchao, the `quant` extra): less memory and
    # faster matmuls, but not the exact image (pipelines/transformer_quantization.py).
    quantize: TransformerQuant = Field("off", description="Quantize the transformer (torchao); not exact")
    # The attention kernel: exact whichever runs (pipelines/attention.py says where each runs).
    attention: AttentionChoice = Field(
        "auto", description="Attention kernel; auto: FlashAttention 4/3 where installed, else PyTorch's"
    )
    # Fused QKV projections (one matmul instead of three per attention): a few percent.
    fuse_qkv: bool | None = Field(None, description="Fused QKV projections; unset: when compiling on CUDA")
    # One generation at start-up so the first user request is not the slow one. Default: on when
    # compiling (where it matters most), off otherwise.
    warmup: bool | None = Field(None, description="One generation at start-up; unset: when compiling")
    # Each size is compiled at start-up, not at its first request. Past one size, dynamo turns the
    # sizes it has seen into symbolic ones and recompiles once: that graph then serves every size, so
    # the sizes listed here are the ones a user's first request must not wait for.
    warmup_sizes: Annotated[list[WarmupSize], Flags("--warmup-size")] = Field(
        default_factory=lambda: ["1024x1024"],
        description="A warm-up size: WIDTHxHEIGHT or SIDE (512-2048, multiples of 8), repeatable",
    )

    @property
    def warmup_shapes(self) -> list[tuple[int, int]]:
        """`warmup_sizes` as (width, height) pairs."""
        return [(int(w), int(h)) for w, _, h in (size.partition("x") for size in self.warmup_sizes)]

    jpeg_quality: int = Field(90, ge=1, le=100, description="Quality of the JPEGs served, 1-100")
    # The opt-in step cache for requests that do not name one (their `cache` field): anything but
    # "off" changes images (pipelines/step_cache.py; benchmarks/quality.py --only approximations measures it).
    step_cache: StepCacheLevel = Field("off", description="Step cache of requests naming none; not exact")


class JobSettings(BaseModel):
    # The hosted service keeps v2 results 1 hour after submission and output files 7 days.
    result_retention_s: int = Field(
        3600, ge=1, description="Seconds a v2 job's result is kept after its submission"
    )
    outputs_retention_s: int = Field(7 * 24 * 3600, ge=1, description="Seconds an output file is kept")


class LimitSettings(BaseModel):
    # Bodies above this are refused with 413 before they are read into memory.
    max_body_bytes: int = Field(1 * 2**20, ge=1024, description="Largest request body, else 413")
    requests_per_minute: int = Field(
        0, ge=0, description="Per-key requests per minute on the generation endpoints, 0 = no limit"
    )
    # CLIP tokens per prompt (and per negative prompt), counted before anything is reserved: the
    # text work and the transformer's context grow with them, at the same price. 4,000 characters of
    # English are ~1,000 tokens; of emoji, ~16,000 (docs/reliability.md, Request bounds).
    max_prompt_tokens: int = Field(
        1000, ge=1, description="CLIP tokens per prompt and per negative prompt, else 422"
    )
    # img2img's input image (docs/contract.md, img2img). Its body carries the image as base64, so
    # the img2img routes take bodies up to 4/3 of `image_max_bytes` (plus the other fields) whatever
    # `max_body_bytes` says.
    image_max_bytes: int = Field(
        20 * 10**6, ge=1024, description="Largest input image (encoded bytes, or a fetched URL's body)"
    )
    # Checked before the pixels are decoded: a small file can expand to gigabytes of pixels.
    image_max_pixels: int = Field(40 * 10**6, ge=64 * 64, description="Largest input image in pixels")
    # A longer side is scaled down (Lanczos) to this before the crop to a multiple of 8; the
    # transformer's work grows with the square of the pixels.
    img2img_max_side: int = Field(
        2048, ge=64, le=8192, description="Longer side an img2img input is scaled down to"
    )
    # Off: an http(s) URL in `image` is refused with 422. On, the server fetches it with the checks of
    # server/image_fetch.py (no private, loopback or link-local address, redirects re-checked).
    image_url_fetch: bool = Field(False, description="Fetch http(s) image URLs (off: send base64)")
    image_url_hosts: list[str] = Field(
        [], description="With URL fetching on, the only hosts fetched from; empty: any public host"
    )


class ConnectionSettings(BaseModel):
    """What one client can hold open, so that slow or idle clients cannot starve the others.

    uvicorn by itself closes neither a connection that never finishes its request head nor one
    that never finishes its body, and its `limit_concurrency` only answers 503 to requests whose
    head is complete: partial-header connections are not counted against anything. These limits
    are enforced by `server/connections.py` (docs/reliability.md, "Connections and start-up").
    The defaults are meant to be safe with `--host 0.0.0.0`.
    """

    # The request line and headers must arrive within this long of the connection opening (or of
    # the previous response on a kept-alive connection); a slowloris client is cut off after it.
    header_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="Seconds for a request's line and headers"
    )
    # A request's body must arrive within this long of its head: 1 MiB in 30 s is 35 KB/s.
    body_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="Seconds for a request's body after its headers"
    )
    # uvicorn's own timer.
    keep_alive_s: int = Field(5, ge=1, le=3600, description="Seconds an idle connection stays open")
    # httptools sets no bound of its own.
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, le=2**24, description="Largest request line and headers, else 431"
    )
    # One more is closed at once, before it costs a file descriptor for long.
    max_connections: int = Field(
        512, ge=1, description="Open connections, all clients; keep it under `ulimit -n` (often 1024)"
    )
    # Behind a reverse proxy on the same host every connection comes from the proxy's address.
    max_connections_per_client: int = Field(
        64,
        ge=0,
        description="Open connections per client address, 0 = no cap; behind a local proxy, raise it "
        "to max connections",
    )


class PricingSettings(BaseModel):
    # Price of one 1024x1024 image at 25 steps; scaled by samples, steps and pixels (docs/contract.md §4).
    # Checked here so that a bad price stops the start with one sentence rather than failing every
    # request: finite, not negative, at most a balance's maximum, and few enough decimals that the
    # exact arithmetic of server/pricing.py stays small (each request's price is rounded to 6 anyway).
    price_per_image: Decimal = Field(
        Decimal("0.039"),
        ge=0,
        le=MAX_CREDITS,
        decimal_places=12,
        description="Credits for one image of the reference pixels and steps",
    )
    reference_steps: int = Field(25, ge=1, description="Steps the price per image is for")
    reference_pixels: int = Field(1024 * 1024, ge=1, description="Pixels the price per image is for")
    # "image": the hosted contract's price, whatever the sampler and guidance. "evaluations": scaled
    # by the transformer evaluations the request runs instead of its steps (two-stage samplers such
    # as Heun run ~2 per step; guidance 1 skips the negative), so that a reference request
    # (a one-evaluation sampler, guidance above 1, reference_steps steps) still costs price_per_image.
    mode: Annotated[Literal["image", "evaluations"], Flags("--pricing-mode")] = Field(
        "image", description="image: the hosted price; evaluations: by transformer evaluations"
    )
    # sd3-med-img2img's own price (the hosted page: ~$0.008 at its defaults): per image of
    # reference_pixels (the cropped input's size) at this many steps. Strength does not lower it:
    # the model runs `num_inference_steps` times whatever the strength. `mode` applies as to txt2img.
    img2img_price_per_image: Decimal = Field(
        Decimal("0.008"),
        ge=0,
        le=MAX_CREDITS,
        decimal_places=12,
        description="Credits for one img2img image of the reference pixels and img2img steps",
    )
    img2img_reference_steps: int = Field(20, ge=1, description="Steps the img2img price is for")
    # The SD3.5 slugs' own prices, per image of reference_pixels at their reference steps (the hosted
    # Large page: ~$0.014; Turbo shows none and gets Large's rate per step; our 3.5 Medium, SD3
    # Medium's). `mode` applies as to txt2img.
    sd35_large_price_per_image: Decimal = Field(
        Decimal("0.014"),
        ge=0,
        le=MAX_CREDITS,
        decimal_places=12,
        description="Credits for one SD3.5 Large image of the reference pixels and its steps",
    )
    sd35_large_reference_steps: int = Field(25, ge=1, description="Steps the SD3.5 Large price is for")
    sd35_turbo_price_per_image: Decimal = Field(
        Decimal("0.014"),
        ge=0,
        le=MAX_CREDITS,
        decimal_places=12,
        description="Credits for one SD3.5 Large Turbo image of the reference pixels and its steps",
    )
    sd35_turbo_reference_steps: int = Field(25, ge=1, description="Steps the SD3.5 Turbo price is for")
    sd35_medium_price_per_image: Decimal = Field(
        Decimal("0.039"),
        ge=0,
        le=MAX_CREDITS,
        decimal_places=12,
        description="Credits for one SD3.5 Medium image of the reference pixels and its steps",
    )
    sd35_medium_reference_steps: int = Field(25, ge=1, description="Steps the SD3.5 Medium price is for")


class QueueSettings(BaseModel):
    max_pending: int = Field(16, ge=1, description="Jobs waiting or running before 429")
    retry_after_s: int = Field(5, ge=1, description="Retry-After of a 429 for a full queue, in seconds")
    # Accepted v2 jobs not yet finished, per server. An accepted job is persisted and waits for room
    # in the device queue (it is never failed for a full queue); past this many, a new submission is
    # refused with 429 and Retry-After before anything is charged.
    max_accepted_jobs: int = Field(1000, ge=1, description="Accepted v2 jobs not yet finished before 429")
    # Compatible waiting requests share one sampling batch up to this many images. 1 = no batching,
    # which keeps every image bit-identical for its seed whatever else is queued (a batch changes
    # float rounding); batching pays mostly below 1024x1024 and on under-used GPUs.
    max_batch_images: int = Field(
        1, ge=1, le=16, description="Images per batch of compatible queued jobs; 1 = off"
    )
    # And up to this many pixels (images x width x height): the batch's activations and VAE decodes
    # grow with pixels, not images. The default, four 1024² images, allows sixteen 512² ones.
    max_batch_pixels: int = Field(
        4 * 1024 * 1024, ge=512 * 512, description="Pixels per batch (images x width x height)"
    )
    # With batching on, how long the device waits for more compatible jobs before it starts a
    # batch that is not full. A few ms against generations of seconds.
    batch_wait_ms: int = Field(
        20, ge=0, le=1000, description="Milliseconds to wait for compatible jobs to fill a batch"
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SD3_", env_nested_delimiter="__", extra="ignore", validate_default=True
    )

    # The ledger, outputs and built models. The platform's per-user data folder (on Linux
    # ~/.local/share/sd3-server), not the current directory: a relative default made `keys create`,
    # run from another folder, create a second, empty ledger whose keys the server then refused.
    data_dir: Path = Field(
        default_factory=lambda: Path(platformdirs.user_data_dir("sd3-server")),
        description="Ledger, outputs and built models",
    )
    # PostgreSQL: postgresql+psycopg://user:pass@host/db
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the ledger; unset: a SQLite file in the data folder"
    )
    host: str = Field("127.0.0.1", description="Address to bind")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Lowest severity logged"
    )
    # One JSON object per line for log collectors, or readable text for a terminal; "auto": text when
    # standard error is a terminal, JSON otherwise (a service manager, a container, a pipe).
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="Log lines as JSON or text; auto: text on a terminal"
    )
    cors_origins: list[str] = Field(
        [], description="Browser origins allowed to call the API (CORS); none: no cross-origin access"
    )
    # Never a user's API key: it can mint credits.
    admin_token: SecretStr | None = Field(
        None, description="Token of the operators' /admin API; unset: that API does not exist"
    )
    # Names this server instance in the ledger, so that after a crash it resumes or refunds what it
    # left open and no one else's. Default: an id made once and kept in the data folder's
    # `instance-id` file, so it survives restarts, a new port and a new host name (a container).
    # The ledger's owner columns hold 128 characters.
    instance_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="Names this instance's reservations and jobs; unset: an id kept in the data folder",
    )
    # The key is "starter", with STARTER_CREDITS credits; the quick start's `make serve` turns this
    # on, like Jupyter's start-up token.
    starter_key: bool = Field(False, description="On a ledger with no key, create one and print it once")

    model: ModelSettings = ModelSettings()
    sampling: SamplingSettings = SamplingSettings()
    memory: MemorySettings = MemorySettings()
    performance: PerformanceSettings = PerformanceSettings()
    pricing: PricingSettings = PricingSettings()
    limits: LimitSettings = LimitSettings()
    connections: ConnectionSettings = ConnectionSettings()
    jobs: JobSettings = JobSettings()
    queue: QueueSettings = QueueSettings()

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'ledger.sqlite3').resolve()}"

    @property
    def outputs_retention_s(self) -> int:
        return self.jobs.outputs_retention_s

    @property
    def resolved_instance_id(self) -> str:
        return self.instance_id or stored_instance_id(self.data_dir)

    @property
    def tiny_model_dir(self) -> Path:
        return self.data_dir / "models" / "tiny-sd3"
