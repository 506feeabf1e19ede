"""Where the weights come from, and which device and precision they run in.

A model source is one of:

- `tiny`: the tiny random-weight SD3, built offline by `pipelines.tiny` and cached as a folder;
- `toy`: the toy SD3 trained on a world of coloured shapes (`pipelines.toy`), a diffusers folder in
  the package, loaded like any other folder;
- `random:sd3-medium` / `random:small`: the real SD3 Medium architecture (or the same structure
  at CPU size) with random weights, built in memory on the target device by
  `pipelines.architectures`, for benchmarking latency and peak memory without any download;
  likewise `random:sd3.5-large` and `random:sd3.5-medium` at full size;
- `tiny:sd3.5-large`, `tiny:sd3.5-large-turbo`, `tiny:sd3.5-medium` (and `tiny:sd3-medium` = `tiny`):
  CPU-sized random-weight twins of each family's structure, built in memory in seconds, so that
  every family's path runs here;
- a local diffusers folder (the output of `save_pretrained`);
- a single-file checkpoint (`.safetensors`/`.ckpt`) in the original SD3 layout, as ComfyUI users
  keep it (`sd3_medium_incl_clips_t5xxlfp16.safetensors`, or `sd3_medium_incl_clips.safetensors`,
  which has no T5 and so loads without T5), or an SD3.5 one as Stability ships it
  (`sd3.5_large.safetensors`, `sd3.5_large_turbo.safetensors`, `sd3.5_medium.safetensors`: MMDiT and
  VAE only, so the text encoders come from the config folder). Its configs and tokenizers come from
  `config` (`--model-config`: a local diffusers folder of the file's family, read fully offline), or
  else from the Hub, as diffusers would fetch them;
- a Hugging Face Hub id.

Every source ends in the same `StableDiffusion3Pipeline`, so the generator never knows where its
weights came from; the model's family (`pipelines.families`) is read from the loaded transformer.
Any failure becomes one `ModelLoadError` whose message says what to change, because a user starting
a server wants a sentence, not a traceback.
"""

from __future__ import annotations

import logging
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.architectures import Scale, build_random_pipeline
from pipelines.checkpoints import SingleFileContents, inspect_single_file
from pipelines.families import FamilyMismatch, resolve_family, structural_family
from pipelines.options import Device, Dtype, Family, FamilyChoice
from pipelines.tiny import ensure_tiny_model

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SINGLE_FILE_SUFFIXES = {".safetensors", ".ckpt", ".pt", ".pth", ".sft"}
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_RANDOM_PREFIX = "random:"
# `random:<name>` sources and the architecture scale each builds (pipelines.architectures).
RANDOM_SOURCES: dict[str, Scale] = {
    "sd3-medium": "full",
    "small": "small",
    "sd3.5-large": "sd3.5-large",
    "sd3.5-medium": "sd3.5-medium",
}
_TINY_PREFIX = "tiny:"
# The CPU-sized twin of each family; `tiny:sd3-medium` is the cached `tiny` model itself.
TINY_TWINS: dict[str, Scale] = {
    "sd3.5-large": "sd3.5-large-small",
    "sd3.5-large-turbo": "sd3.5-large-small",
    "sd3.5-medium": "sd3.5-medium-small",
}
# The configs fetched for a single file of each family when none is given: those diffusers itself
# fetches, except for Large Turbo, which diffusers reads with Large's (the same configs) but whose
# users have accepted the Turbo repository's licence, not necessarily Large's.
_HUB_CONFIGS: dict[Family, str] = {
    "sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
    "sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
    "sd3.5-large": "stabilityai/stable-diffusion-3.5-large",
    "sd3.5-large-turbo": "stabilityai/stable-diffusion-3.5-large-turbo",
}
_FAMILY_NAMES: dict[Family, str] = {
    "sd3-medium": "SD3 Medium",
    "sd3.5-medium": "SD3.5 Medium",
    "sd3.5-large": "SD3.5 Large",
    "sd3.5-large-turbo": "SD3.5 Large Turbo",
}


def _config_folder_of(family: Family) -> str:
    """How the messages name the --model-config a file of `family` needs."""
    return f"a local diffusers folder of {_FAMILY_NAMES[family]} ({_HUB_CONFIGS[family]})"


class ModelLoadError(Exception):
    """A model that cannot be loaded: the message is one sentence saying what to change."""


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    source: str
    tiny_dir: Path  # where `tiny` is written once and cached
    revision: str | None = None
    config: str | None = None  # diffusers folder/id describing a single-file checkpoint
    device: Device = "auto"
    dtype: Dtype = "auto"
    token: str | None = None  # None: huggingface_hub uses HF_TOKEN or the saved login
    load_t5: bool = True
    # T5-XXL in 8-bit (bitsandbytes, CUDA or CPU): less memory for a little latency (docs/performance.md §3).
    t5_8bit: bool = False
    # False: leave the weights on the CPU, for a memory plan that offloads them (pipelines.memory).
    place_on_device: bool = True
    # T5 kept on the CPU by the memory plan: an 8-bit T5 is then quantized there, never on the GPU.
    t5_on_cpu: bool = False
    # The family to serve the weights as; `auto` reads it from them (pipelines.families).
    family: FamilyChoice = "auto"


@dataclass(frozen=True)
class LoadedModel:
    pipe: Any  # StableDiffusion3Pipeline
    device: torch.device
    dtype: torch.dtype
    description: str
    family: Family = "sd3-medium"


def resolve_device(name: Device) -> torch.device:
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


def _cpu_has_any(*checks: str) -> bool:
    # PyTorch's own cpuinfo checks answer on every OS; they are private, so a PyTorch without one
    # reads as "no", the safe answer for every question asked of them here.
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively: AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake)
    or AMX (Intel Sapphire Rapids and later).

    oneDNN runs bf16 matmuls there at several times the fp32 rate (5.4x on a Zen 4 EPYC,
    benchmarks/cpu_matmul.py) and emulates them elsewhere, slower than fp32 (6x slower on an
    AVX2-only EPYC), so a CPU without them gets fp32.
    """
    return _cpu_has_any("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def cpu_has_int8_dot_products() -> bool:
    """Whether this CPU has the int8 dot-product instructions (AVX512-VNNI or AMX) that PyTorch's CPU
    int8 matmul needs to be fast (`--quantize int8`, pipelines/transformer_quantization.py)."""
    return _cpu_has_any("_is_vnni_supported", "_is_amx_tile_supported")


def resolve_dtype(name: Dtype, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cpu":
            # CPUs are slow and often wrong in fp16; bf16 only where the hardware has it.
            return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
        return torch.float16  # what SD3 is served in on GPUs
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
    if isinstance(exc, LocalEntryNotFoundError) or _unreachable(exc):
        return ModelLoadError(
            f"The model '{source}' is not in the local Hugging Face cache and the Hub cannot be reached: "
            f"accept its licence on https://huggingface.co/{source}, set HF_TOKEN to a token of that "
            "account and start once online to download it (or pass a local diffusers folder or "
            "single file); `--model tiny` runs offline with no weights."
        )
    return ModelLoadError(f"The model '{source}' could not be loaded: {exc}")


def _unreachable(exc: BaseException) -> bool:
    """Whether a load failed because the Hub could not be reached (diffusers wraps that in an OSError)."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    seen: BaseException | None = exc
    for _ in range(16):  # the cause chain is short; the bound guards against a cycle
        if seen is None:
            return False
        if isinstance(seen, (LocalEntryNotFoundError, ConnectionError, TimeoutError, socket.gaierror)):
            return True
        # httpx's transport errors subclass neither of the above.
        if type(seen).__name__ in ("ConnectError", "ConnectTimeout"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _from_pretrained(path_or_id: str, spec: ModelSpec, dtype: torch.dtype) -> Any:
    from diffusers import StableDiffusion3Pipeline

    extra: dict[str, Any] = {}
    if not spec.load_t5:
        extra.update(text_encoder_3=None, tokenizer_3=None)
    elif spec.t5_8bit:
        extra["text_encoder_3"] = _t5_in_8bit(path_or_id, spec, dtype)
    return StableDiffusion3Pipeline.from_pretrained(
        path_or_id, revision=spec.revision, token=spec.token, dtype=dtype, **extra
    )


def _t5_in_8bit(path_or_id: str, spec: ModelSpec, dtype: torch.dtype) -> Any:
    """T5-XXL quantized to int8 by bitsandbytes, the path diffusers and transformers document.

    bitsandbytes because it is maintained with transformers, quantizes at load time from the
    ordinary fp16 weights (no separate checkpoint), and LLM.int8 keeps T5's outlier features in
    fp16 — which is why its quality loss on SD3 prompts is negligible (docs/performance.md §7).
    """
    from transformers import BitsAndBytesConfig, T5EncoderModel

    _require_bitsandbytes()
    return T5EncoderModel.from_pretrained(
        path_or_id,
        subfolder="text_encoder_3",
        revision=spec.revision or "main",
        token=spec.token,
        quantization_config=BitsAndBytesConfig(load_in_8bit=True),
        dtype=dtype,
        # By default transformers quantizes onto the first GPU; a T5 the plan keeps on the CPU
        # would then cross the GPU once at its full 7.9 GB, which a small card cannot hold.
        device_map={"": "cpu"} if spec.t5_on_cpu else None,
    )


def _t5_to_8bit_if_asked(pipe: Any, spec: ModelSpec, device: torch.device) -> None:
    """Quantize an already built T5 (single file, random weights): the folder path does it at load."""
    if not spec.t5_8bit or pipe.text_encoder_3 is None:
        return
    _require_bitsandbytes()
    from pipelines.quantization import quantize_linear_8bit

    quantize_linear_8bit(pipe.text_encoder_3, torch.device("cpu") if spec.t5_on_cpu else device)


def _require_bitsandbytes() -> None:
    from pipelines.quantization import bitsandbytes_problem

    if (problem := bitsandbytes_problem()) is not None:
        raise ModelLoadError(problem)


def _read_single_file(path: Path) -> SingleFileContents:
    import pickle

    from safetensors import SafetensorError

    try:
        return inspect_single_file(path)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, ValueError, OSError) as exc:
        raise ModelLoadError(
            f"'{path}' could not be read as a checkpoint ({type(exc).__name__}): check that the file is "
            "complete (a download may have been cut short)."
        ) from exc


def _single_file_config(
    spec: ModelSpec, path: Path, contents: SingleFileContents, family: Family
) -> tuple[str, bool]:
    """The diffusers configs to read the file with, and whether they are a local folder."""
    if spec.config is None:
        return _HUB_CONFIGS[family], False
    folder = Path(spec.config).expanduser()
    if folder.is_dir():
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(
                f"--model-config '{spec.config}' is a folder but not a diffusers model (it has no "
                f"model_index.json): pass {_config_folder_of(family)}; configs and tokenizers suffice."
            )
        _check_config_structure(folder, path, contents, family)
        return str(folder), True
    if not _HUB_ID.match(spec.config):
        raise ModelLoadError(
            f"--model-config '{spec.config}' is neither an existing folder nor a Hugging Face id: pass "
            f"{_config_folder_of(family)}."
        )
    return spec.config, False


def _check_config_structure(folder: Path, path: Path, contents: SingleFileContents, family: Family) -> None:
    """Refuse a config folder of another family before diffusers reads the file with it.

    diffusers builds the transformer from the folder's config and loads the file's weights into it
    without comparing the two: SD3 Medium configs with an SD3.5 file leave the qk-norm weights
    unused, and the failure (if any) names a tensor, not the folder.
    """
    import json

    config_file = folder / "transformer" / "config.json"
    try:
        described = structural_family(json.loads(config_file.read_text()))
    except (OSError, ValueError):
        return  # diffusers will say what is wrong with the folder
    if described != contents.family:
        raise ModelLoadError(
            f"'{path.name}' holds {_FAMILY_NAMES[contents.family]} weights but --model-config "
            f"'{folder}' describes {_FAMILY_NAMES[described]}: pass {_config_folder_of(family)}."
        )


def _config_fetch_error(
    path: Path, config: str, contents: SingleFileContents, family: Family, exc: Exception
) -> ModelLoadError:
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError

    if isinstance(exc, GatedRepoError):
        why = f"'{config}' is gated, so fetching it needs an accepted licence and HF_TOKEN"
    elif isinstance(exc, LocalEntryNotFoundError):
        why = f"'{config}' is not in the local cache and the Hub cannot be reached (offline?)"
    else:
        why = f"fetching '{config}' failed ({type(exc).__name__})"
    return ModelLoadError(
        f"The single file '{path.name}' carries weights but no configs or tokenizers, and {why}: pass "
        f"--model-config with {_config_folder_of(family)}; {_what_the_folder_needs(contents)}."
    )


def _what_the_folder_needs(contents: SingleFileContents) -> str:
    if contents.has_text_encoders:
        return "its configs and tokenizers suffice"
    return "the file has no text encoders, so the folder must hold their weights too"


def _from_single_file(path: Path, spec: ModelSpec, dtype: torch.dtype) -> Any:
    from diffusers import StableDiffusion3Pipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if path.suffix.lower() == ".sft":
        # diffusers chooses its reader by the extension and reads anything but .safetensors with torch.load.
        raise ModelLoadError(
            f"'{path.name}' is a safetensors file under another name: rename it to .safetensors."
        )
    contents = _read_single_file(path)
    if not contents.is_sd3:
        guess = contents.looks_like()
        raise ModelLoadError(
            f"'{path}' is not a Stable Diffusion 3 checkpoint (it has no MMDiT 'joint_blocks' weights"
            + (f" and looks like {guess}" if guess else "")
            + "): pass an SD3 single file such as sd3_medium_incl_clips_t5xxlfp16.safetensors."
        )
    try:
        # Known before loading, to name the configs: the structure from the key names, and Large
        # Turbo from the file name (sd3.5_large_turbo.safetensors), by the rule load_model applies.
        family = resolve_family(contents.structure, spec.family, source=str(path))
    except FamilyMismatch as exc:
        raise ModelLoadError(f"The model '{spec.source}' cannot be served: {exc}.") from exc
    config, local = _single_file_config(spec, path, contents, family)
    extra: dict[str, Any] = {}
    if not spec.load_t5 or (contents.has_text_encoders and not contents.has_t5):
        # Said explicitly: otherwise diffusers would take T5 from the config folder's weights if it
        # has them, or stop with an error if it has not. A file with CLIPs but no T5
        # (sd3_medium_incl_clips) is a CLIP-only model; a file with no text encoders at all (every
        # SD3.5 file Stability ships) takes all three from the config folder, T5 included.
        extra.update(text_encoder_3=None, tokenizer_3=None)
        if spec.load_t5:
            log.info("%s has no T5-XXL weights: loading it without T5 (CLIP-only context)", path.name)
    if not contents.has_text_encoders:
        extra.update(_text_encoders_from_config(path, spec, contents, family, config, local, dtype))
    try:
        pipe = StableDiffusion3Pipeline.from_single_file(
            str(path),
            config=config,
            # A local folder must never lead to a download, whatever diffusers would otherwise try.
            local_files_only=local,
            token=spec.token,
            revision=None if local else spec.revision,
            dtype=dtype,
            **extra,
        )
    except SingleFileComponentError as exc:
        if contents.has_text_encoders:
            fix = "use a file that includes the text encoders (sd3_medium_incl_clips*.safetensors) or"
        else:
            fix = "the file has no text encoders (as Stability ships SD3.5), so pass"
        raise ModelLoadError(
            f"'{path.name}' lacks the weights of a component and '{config}' has none for it either "
            f"({exc.message.splitlines()[0]}): {fix} a --model-config folder that holds their weights "
            f"({_config_folder_of(family)}, with its text_encoder* folders)."
        ) from exc
    except (HfHubHTTPError, LocalEntryNotFoundError) as exc:
        if local:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(
                f"--model-config '{config}' lacks a file that loading needs ({first_line}): pass a complete "
                f"{_config_folder_of(family).removeprefix('a local ')} (configs and tokenizers)."
            ) from exc
        raise _config_fetch_error(path, config, contents, family, exc) from exc
    _finish_single_file(pipe, path)
    return pipe


def _text_encoders_from_config(
    path: Path,
    spec: ModelSpec,
    contents: SingleFileContents,
    family: Family,
    config: str,
    local: bool,
    dtype: torch.dtype,
) -> dict[str, Any]:
    """The text encoders of a file that has none, read from the config folder's weights.

    diffusers 0.42 would take a component missing from the file from the config folder, but it
    looks there for diffusers' weight names only (`diffusion_pytorch_model.*`), never the
    transformers ones the text encoders are saved under (`model.safetensors`), and so refuses every
    SD3.5 file as Stability ships it. Loading them here and passing them in is its documented way
    of supplying a component.
    """
    from huggingface_hub.errors import HfHubHTTPError
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    parts: list[tuple[str, Any]] = [
        ("text_encoder", CLIPTextModelWithProjection),
        ("text_encoder_2", CLIPTextModelWithProjection),
    ]
    if spec.load_t5:
        # Full precision even with --t5 8bit: `_t5_to_8bit_if_asked` quantizes it after, as for a
        # T5 read from the file.
        parts.append(("text_encoder_3", T5EncoderModel))
    loaded: dict[str, Any] = {}
    try:
        for name, cls in parts:
            loaded[name] = cls.from_pretrained(
                config,
                subfolder=name,
                local_files_only=local,
                token=spec.token,
                revision=None if local else spec.revision,
                dtype=dtype,
            ).eval()
    except (OSError, HfHubHTTPError) as exc:
        if not local:
            raise _config_fetch_error(path, config, contents, family, _hub_cause(exc) or exc) from exc
        raise ModelLoadError(
            f"'{path.name}' has no text encoders (as Stability ships SD3.5) and --model-config '{config}' "
            f"has no weights for its {name} either: pass {_config_folder_of(family)} that holds the text "
            "encoders' weights (its text_encoder, text_encoder_2 and text_encoder_3 folders)."
        ) from exc
    return loaded


def _hub_cause(exc: BaseException) -> Exception | None:
    """The Hub error under a transformers `OSError`, which wraps it (a gated or unreachable repo)."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    seen: BaseException | None = exc
    for _ in range(16):  # a short chain; the bound guards against a cycle
        if seen is None:
            return None
        if isinstance(seen, (HfHubHTTPError, LocalEntryNotFoundError)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _finish_single_file(pipe: Any, path: Path) -> None:
    """Repair what diffusers' single-file path leaves undone, then refuse anything still unloaded."""
    t5 = pipe.text_encoder_3
    if t5 is not None and t5.encoder.embed_tokens.weight.is_meta:
        # The files store T5's input embedding once, as `shared.weight`. diffusers 0.42 loads it into
        # a model built on the meta device, and with transformers 5 the encoder's tied copy is then no
        # longer the same tensor: it stays on meta. Point the encoder back at the shared table.
        t5.encoder.embed_tokens = t5.shared
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        # diffusers 0.42 builds the single-file T5 without calling eval(): its dropout (0.1 in T5 v1.1's
        # config) would stay on and make every prompt encoding random. Inference wants eval mode.
        module.eval()
        missing = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if missing:
            # diffusers does not check that every weight was found; an unloaded one sits on the meta
            # device and would fail later, far from its cause.
            raise ModelLoadError(
                f"'{path.name}' has no weights for {len(missing)} tensors of the {name} (e.g. {missing[0]}): "
                "the file is incomplete or not in SD3's original layout."
            )


def _from_random(name: str, spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> Any:
    scale = RANDOM_SOURCES.get(name)
    if scale is None:
        choices = " or ".join(f"{_RANDOM_PREFIX}{n}" for n in RANDOM_SOURCES)
        raise ModelLoadError(f"'{_RANDOM_PREFIX}{name}' is not a known architecture: use {choices}.")
    try:
        return build_random_pipeline(scale, device=device, dtype=dtype, with_t5=spec.load_t5)
    except torch.OutOfMemoryError as exc:
        raise ModelLoadError(
            f"The {name} architecture does not fit in the memory of {device} in {dtype}: try --dtype fp16, "
            f"--no-t5, or {_RANDOM_PREFIX}small."
        ) from exc


def _load(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> tuple[Any, str]:
    source = spec.source
    if source.startswith(_TINY_PREFIX):
        family = source.removeprefix(_TINY_PREFIX)
        if family == "sd3-medium":
            source = "tiny"
        elif family in TINY_TWINS:
            pipe = build_random_pipeline(TINY_TWINS[family], device=torch.device("cpu"), dtype=dtype)
            return pipe, f"tiny random-weight {family} twin (no weights loaded)"
        else:
            choices = ", ".join(f"{_TINY_PREFIX}{n}" for n in ("sd3-medium", *TINY_TWINS))
            raise ModelLoadError(f"'{source}' is not a known tiny twin: use tiny or one of {choices}.")
    if source == "tiny":
        folder = ensure_tiny_model(spec.tiny_dir)
        return _from_pretrained(str(folder), spec, dtype), f"tiny random-weight SD3 ({folder})"
    if source == "toy":
        folder = _toy_folder()
        return _from_pretrained(str(folder), spec, dtype), f"toy SD3 trained on coloured shapes ({folder})"
    if source.startswith(_RANDOM_PREFIX):
        name = source.removeprefix(_RANDOM_PREFIX)
        # Built where it will live: on the device, or on the CPU for a plan that offloads (an 8 GB
        # card could not hold the whole architecture even for a moment).
        pipe = _from_random(name, spec, device if spec.place_on_device else torch.device("cpu"), dtype)
        _t5_to_8bit_if_asked(pipe, spec, device)
        return pipe, f"random-weight {name} architecture (no weights loaded)"
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
        pipe = _from_single_file(path, spec, dtype)
        _t5_to_8bit_if_asked(pipe, spec, device)
        no_t5 = "" if pipe.text_encoder_3 is not None else ", without T5"
        return pipe, f"single-file checkpoint {path}{no_t5}"
    if not _HUB_ID.match(source):
        raise ModelLoadError(
            f"'{source}' is neither an existing file or folder nor a Hugging Face id like "
            "'stabilityai/stable-diffusion-3-medium-diffusers'."
        )
    return _from_pretrained(source, spec, dtype), f"Hugging Face model {source}"


def _toy_folder() -> Path:
    import pipelines.toy

    folder = pipelines.toy.MODEL_DIR
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(
            f"The toy model's weights are not in '{folder}': train them with `python -m "
            f"pipelines.toy.train {folder}` (about an hour on two CPU cores), or use --model tiny."
        )
    return folder


def quiet_libraries() -> None:
    """Silence per-file progress bars: the server's own log and progress say what is happening."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    # bitsandbytes warns at import, on CPUs with AVX512-bf16, that an optional 4-bit kernel package
    # is missing; only its 8-bit layers are used here, so the warning would only mislead.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # LLM.int8 computes in fp16 by design; with an fp32 pipeline (the CPU) bitsandbytes says so on
    # every T5 layer call, which would flood the server's log.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load the pipeline described by `spec` onto its device, or raise `ModelLoadError`."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    quiet_libraries()
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    try:
        pipe, description = _load(spec, device, dtype)
    except ModelLoadError:
        raise
    except (HfHubHTTPError, LocalEntryNotFoundError) as exc:
        raise _hub_error(spec.source, exc) from exc
    except (OSError, ValueError) as exc:
        if _unreachable(exc):
            raise _hub_error(spec.source, exc) from exc
        raise ModelLoadError(f"The model '{spec.source}' could not be loaded: {exc}") from exc
    try:
        family = resolve_family(pipe.transformer.config, spec.family, source=spec.source)
    except FamilyMismatch as exc:
        raise ModelLoadError(f"The model '{spec.source}' cannot be served: {exc}.") from exc
    _check_clip_l_projection(pipe)
    if spec.place_on_device:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(pipe=pipe, device=device, dtype=dtype, description=description, family=family)


def _check_clip_l_projection(pipe: Any) -> None:
    """SD3 pools CLIP-L *un-projected* (docs/sampling.md §8); diffusers reads the projected output.

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
