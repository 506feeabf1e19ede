"""Where the weights come from, and which device and precision they run in.

A model source is one of: `tiny` (built offline by `pipelines.tiny`), a local diffusers folder,
a single-file checkpoint (`.safetensors`/`.ckpt`), or a Hugging Face Hub id. Every source ends
in the same `StableDiffusion3Pipeline`, so the generator never knows where its weights came
from. Any failure becomes one `ModelLoadError` whose message says what to change, because a
user starting a server wants a sentence, not a traceback.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.tiny import ensure_tiny_model

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SINGLE_FILE_SUFFIXES = {".safetensors", ".ckpt", ".pt", ".pth", ".sft"}
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class ModelLoadError(Exception):
    """A model that cannot be loaded: the message is one sentence saying what to change."""


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    source: str
    tiny_dir: Path  # where `tiny` is written once and cached
    revision: str | None = None
    config: str | None = None  # diffusers folder/id describing a single-file checkpoint
    device: str = "auto"
    dtype: str = "auto"
    token: str | None = None  # None: huggingface_hub uses HF_TOKEN or the saved login
    load_t5: bool = True


@dataclass(frozen=True)
class LoadedModel:
    pipe: Any  # StableDiffusion3Pipeline
    device: torch.device
    dtype: torch.dtype
    description: str


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            "Device 'cuda' was asked for but PyTorch sees no CUDA GPU: install a CUDA "
            "build of torch (README.md) or use --device auto."
        )
    if name == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(
            "Device 'mps' was asked for but this PyTorch has no Apple MPS backend; use --device auto."
        )
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # Half precision is what SD3 is served in on GPUs; CPUs are slow and often wrong in fp16.
        return torch.float32 if device.type == "cpu" else torch.float16
    return _DTYPES[name]


def _hub_error(source: str, exc: Exception) -> ModelLoadError:
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        return ModelLoadError(
            f"The model '{source}' is gated: accept its licence on https://huggingface.co/{source} "
            "while logged in, then set HF_TOKEN (or SD3_MODEL__HF_TOKEN) to a token of that account."
        )
    if isinstance(exc, RepositoryNotFoundError):
        return ModelLoadError(
            f"The model '{source}' was not found on the Hugging Face Hub: check the id, or set HF_TOKEN "
            "if it is a private repository."
        )
    if isinstance(exc, RevisionNotFoundError):
        return ModelLoadError(f"The revision asked for does not exist in '{source}': check --revision.")
    if isinstance(exc, LocalEntryNotFoundError):
        return ModelLoadError(
            f"The model '{source}' is not in the local Hugging Face cache and cannot be downloaded "
            "(offline?): connect once to download it, or pass a local diffusers folder."
        )
    return ModelLoadError(f"The model '{source}' could not be loaded: {exc}")


def _from_pretrained(path_or_id: str, spec: ModelSpec, dtype: torch.dtype) -> Any:
    from diffusers import StableDiffusion3Pipeline

    extra: dict[str, Any] = {}
    if not spec.load_t5:
        extra.update(text_encoder_3=None, tokenizer_3=None)
    return StableDiffusion3Pipeline.from_pretrained(
        path_or_id, revision=spec.revision, token=spec.token, dtype=dtype, **extra
    )


def _from_single_file(path: Path, spec: ModelSpec, dtype: torch.dtype) -> Any:
    from diffusers import StableDiffusion3Pipeline

    extra: dict[str, Any] = {}
    if not spec.load_t5:
        extra.update(text_encoder_3=None, tokenizer_3=None)
    if spec.config:
        extra["config"] = spec.config
    return StableDiffusion3Pipeline.from_single_file(str(path), token=spec.token, dtype=dtype, **extra)


def _load(spec: ModelSpec, dtype: torch.dtype) -> tuple[Any, str]:
    source = spec.source
    if source == "tiny":
        folder = ensure_tiny_model(spec.tiny_dir)
        return _from_pretrained(str(folder), spec, dtype), f"tiny random-weight SD3 ({folder})"
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"'{source}' is a folder but not a diffusers model (it has no model_index.json): "
                "pass the folder that `save_pretrained` wrote, or a single .safetensors file."
            )
        return _from_pretrained(str(path), spec, dtype), f"diffusers folder {path}"
    if path.is_file():
        if path.suffix.lower() not in _SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(f"'{source}' is a file but not a checkpoint (.safetensors or .ckpt).")
        return _from_single_file(path, spec, dtype), f"single-file checkpoint {path}"
    if not _HUB_ID.match(source):
        raise ModelLoadError(
            f"'{source}' is neither an existing file or folder nor a Hugging Face id like "
            "'stabilityai/stable-diffusion-3-medium-diffusers'."
        )
    return _from_pretrained(source, spec, dtype), f"Hugging Face model {source}"


def quiet_libraries() -> None:
    """Silence per-file progress bars: the server's own log and progress say what is happening."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load the pipeline described by `spec` onto its device, or raise `ModelLoadError`."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    quiet_libraries()
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    try:
        pipe, description = _load(spec, dtype)
    except ModelLoadError:
        raise
    except (HfHubHTTPError, LocalEntryNotFoundError) as exc:
        raise _hub_error(spec.source, exc) from exc
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"The model '{spec.source}' could not be loaded: {exc}") from exc
    _check_clip_l_projection(pipe)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(pipe=pipe, device=device, dtype=dtype, description=description)


def _check_clip_l_projection(pipe: Any) -> None:
    """SD3 pools CLIP-L *un-projected* (sampling.md §7); diffusers reads the projected output.

    The two agree when the checkpoint's CLIP-L projection is the identity, as SD3's is. If a
    checkpoint carries another matrix, use the identity so the pooled vector is the one SD3 and
    ComfyUI use, and say so once.
    """
    weight = pipe.text_encoder.text_projection.weight
    eye = torch.eye(weight.shape[0], weight.shape[1], dtype=weight.dtype, device=weight.device)
    if weight.shape[0] == weight.shape[1] and torch.allclose(weight, eye):
        return
    log.warning("CLIP-L text_projection is not the identity; replacing it with the identity (SD3 pooling)")
    with torch.no_grad():
        if weight.shape[0] != weight.shape[1]:
            raise ModelLoadError(
                "This checkpoint's CLIP-L projection is not square, so it is not SD3's CLIP-L."
            )
        weight.copy_(eye)
