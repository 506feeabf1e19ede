"""SD3 and SD3.5 single-file checkpoints in the original (Stability / ComfyUI) key layout.

ComfyUI users keep SD3 Medium as one safetensors file, e.g. `sd3_medium_incl_clips_t5xxlfp16.safetensors`
or the same without T5. Its keys follow Stability's reference code, not diffusers:

| component | prefix in the file                | key layout below the prefix                    |
| --------- | --------------------------------- | ---------------------------------------------- |
| MMDiT     | `model.diffusion_model.`          | Stability's `joint_blocks.N.{x,context}_block` |
| VAE       | `first_stage_model.`              | the LDM autoencoder (`encoder.down.N.block.M`) |
| CLIP-L    | `text_encoders.clip_l.transformer.` | Hugging Face `CLIPTextModel` (`text_model.*`)  |
| CLIP-G    | `text_encoders.clip_g.transformer.` | Hugging Face, plus `text_projection.weight`    |
| T5-XXL    | `text_encoders.t5xxl.transformer.`  | Hugging Face `T5EncoderModel`                  |

SD3.5 files (`sd3.5_large.safetensors`, `sd3.5_large_turbo.safetensors`, `sd3.5_medium.safetensors`)
use the same layout with more keys per block, and Stability ships them as MMDiT + VAE only (the text
encoders are separate files):

| SD3.5 part                          | keys below `joint_blocks.N.`                                   |
| ----------------------------------- | -------------------------------------------------------------- |
| qk-norm (RMS, every block)          | `{x,context}_block.attn.ln_q.weight`, `...attn.ln_k.weight`    |
| MMDiT-X second attention (Medium)   | `x_block.attn2.{qkv,proj}.*`, `x_block.attn2.ln_{q,k}.weight`  |
| MMDiT-X adaLN (Medium, dual blocks) | `x_block.adaLN_modulation.1`, 9 chunks instead of 6            |

diffusers reads such a file with `StableDiffusion3Pipeline.from_single_file`, converting each part
into its own layout (`diffusers.loaders.single_file_utils`). This module is the inverse: it writes
a diffusers pipeline back into the original layout. Two uses: a converter users can run,

    sd3-convert DIFFUSERS_DIR OUT.safetensors [--no-t5 | --no-text-encoders] [--dtype fp16]

and the way the tests make a real single file from the tiny model, so that the single-file loading
path is exercised end to end without downloading anything.

`inspect_single_file` reads only a checkpoint's key names and says which parts it holds and which
family its MMDiT is, so the loader can reject a file that is not SD3, load a file without T5 without
T5, and check the configs it is given against the weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import struct
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.families import structural_family
from pipelines.options import Family

log = logging.getLogger(__name__)

TRANSFORMER_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class _Renamer:
    """Moves tensors from a diffusers state dict to original keys, and remembers what it moved.

    Every converter ends with `finish()`, which fails if a diffusers key was left behind: a weight
    silently dropped would give a file that loads (diffusers leaves it at its init value or on the
    meta device) but draws different images, which is far harder to notice than an error here.
    """

    def __init__(self, state: Mapping[str, torch.Tensor], what: str) -> None:
        self.state = state
        self.what = what
        self.used: set[str] = set()
        self.out: dict[str, torch.Tensor] = {}

    def has(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str) -> torch.Tensor:
        self.used.add(key)
        return self.state[key]

    def move(self, src: str, dst: str) -> None:
        self.out[dst] = self.take(src)

    def move_linear(self, src: str, dst: str) -> None:
        """`src.weight`/`src.bias` to `dst.weight`/`dst.bias` (the bias only where there is one)."""
        self.move(f"{src}.weight", f"{dst}.weight")
        if self.has(f"{src}.bias"):
            self.move(f"{src}.bias", f"{dst}.bias")

    def finish(self) -> dict[str, torch.Tensor]:
        left = sorted(set(self.state) - self.used)
        if left:
            raise ValueError(f"{self.what}: no original-layout name for {left[:5]} ({len(left)} keys)")
        return self.out


def _swap_halves(weight: torch.Tensor) -> torch.Tensor:
    # Stability's final adaLN layers emit (shift, scale); diffusers' AdaLayerNormContinuous emits
    # (scale, shift). Swapping the two halves converts either way (it is its own inverse).
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def transformer_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers `SD3Transformer2DModel` keys -> Stability MMDiT keys (without the file prefix).

    The inverse of diffusers' `convert_sd3_transformer_checkpoint_to_diffusers`: q, k and v are
    fused back into one `qkv` per stream, and the two adaLN layers of `AdaLayerNormContinuous`
    (the last block's text stream and the final layer) get their halves swapped back. SD3.5's extra
    weights go the same way: qk-norm weights renamed, MMDiT-X's `attn2` q, k, v fused like `attn`'s;
    the 9-chunk adaLN of a dual-attention block is moved as is, since diffusers' converter keeps
    Stability's chunk order there.
    """
    r = _Renamer(state, "transformer")
    r.move("pos_embed.pos_embed", "pos_embed")
    r.move_linear("pos_embed.proj", "x_embedder.proj")
    r.move_linear("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0")
    r.move_linear("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2")
    r.move_linear("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0")
    r.move_linear("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2")
    r.move_linear("context_embedder", "context_embedder")

    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")})
    for i in blocks:
        d, o = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        # The last block is `context_pre_only`: its text stream has no output projection and no MLP,
        # and its text adaLN is an AdaLayerNormContinuous (two chunks, swapped) instead of six chunks.
        pre_only = not r.has(f"{d}.attn.to_add_out.weight")

        for part in ("weight", "bias"):
            qkv = [r.take(f"{d}.attn.to_{n}.{part}") for n in "qkv"]
            r.out[f"{o}.x_block.attn.qkv.{part}"] = torch.cat(qkv)
            ctx = [r.take(f"{d}.attn.add_{n}_proj.{part}") for n in "qkv"]
            r.out[f"{o}.context_block.attn.qkv.{part}"] = torch.cat(ctx)
        r.move_linear(f"{d}.attn.to_out.0", f"{o}.x_block.attn.proj")
        if not pre_only:
            r.move_linear(f"{d}.attn.to_add_out", f"{o}.context_block.attn.proj")
        # SD3.5's RMS q/k norms; SD3 Medium has none.
        for src, dst in (
            ("norm_q", "x_block.attn.ln_q"),
            ("norm_k", "x_block.attn.ln_k"),
            ("norm_added_q", "context_block.attn.ln_q"),
            ("norm_added_k", "context_block.attn.ln_k"),
        ):
            if r.has(f"{d}.attn.{src}.weight"):
                r.move(f"{d}.attn.{src}.weight", f"{o}.{dst}.weight")
        # SD3.5 Medium's second image-only attention ("MMDiT-X"); SD3 Medium has none.
        if r.has(f"{d}.attn2.to_q.weight"):
            for part in ("weight", "bias"):
                qkv = [r.take(f"{d}.attn2.to_{n}.{part}") for n in "qkv"]
                r.out[f"{o}.x_block.attn2.qkv.{part}"] = torch.cat(qkv)
            r.move_linear(f"{d}.attn2.to_out.0", f"{o}.x_block.attn2.proj")
            for src, dst in (("norm_q", "ln_q"), ("norm_k", "ln_k")):
                if r.has(f"{d}.attn2.{src}.weight"):
                    r.move(f"{d}.attn2.{src}.weight", f"{o}.x_block.attn2.{dst}.weight")

        r.move_linear(f"{d}.norm1.linear", f"{o}.x_block.adaLN_modulation.1")
        if pre_only:
            for part in ("weight", "bias"):
                weight = r.take(f"{d}.norm1_context.linear.{part}")
                r.out[f"{o}.context_block.adaLN_modulation.1.{part}"] = _swap_halves(weight)
        else:
            r.move_linear(f"{d}.norm1_context.linear", f"{o}.context_block.adaLN_modulation.1")
        r.move_linear(f"{d}.ff.net.0.proj", f"{o}.x_block.mlp.fc1")
        r.move_linear(f"{d}.ff.net.2", f"{o}.x_block.mlp.fc2")
        if not pre_only:
            r.move_linear(f"{d}.ff_context.net.0.proj", f"{o}.context_block.mlp.fc1")
            r.move_linear(f"{d}.ff_context.net.2", f"{o}.context_block.mlp.fc2")

    r.move_linear("proj_out", "final_layer.linear")
    for part in ("weight", "bias"):
        r.out[f"final_layer.adaLN_modulation.1.{part}"] = _swap_halves(r.take(f"norm_out.linear.{part}"))
    return r.finish()


_VAE_FIXED = {
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_norm_out": "decoder.norm_out",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_KEY = re.compile(
    r"^(?P<side>encoder|decoder)\.(?:"
    r"(?P<blocks>down_blocks|up_blocks)\.(?P<block>\d+)\.(?:resnets\.(?P<res>\d+)|(?P<sampler>downsamplers|upsamplers)\.0)"
    r"|mid_block\.(?:resnets\.(?P<mid_res>\d+)|attentions\.0\.(?P<attn>group_norm|to_q|to_k|to_v|to_out\.0))"
    r")\.(?P<rest>.+)$"
)


def vae_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers `AutoencoderKL` keys -> LDM autoencoder keys (the inverse of `convert_ldm_vae_checkpoint`).

    The LDM decoder numbers its up blocks from the lowest resolution *up* (`up.0` is the last to
    run), diffusers in running order, hence the reversal. The mid-block attention is 1x1 convolutions
    in the original and linear layers in diffusers, hence the two trailing unit dimensions.
    """
    r = _Renamer(state, "VAE")
    up_blocks = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("decoder.up_blocks."))
    for key in list(state):
        stem, _, part = key.rpartition(".")
        if stem in _VAE_FIXED:
            r.move(key, f"{_VAE_FIXED[stem]}.{part}")
            continue
        m = _VAE_KEY.match(key)
        if m is None:
            # conv_in, conv_out and (where a VAE has them) quant_conv / post_quant_conv keep their names.
            r.move(key, key)
            continue
        side, rest = m["side"], m["rest"]
        if m["blocks"]:
            block = int(m["block"])
            level = block if side == "encoder" else up_blocks - 1 - block
            stage = f"{side}.{'down' if side == 'encoder' else 'up'}.{level}"
            if m["res"] is not None:
                rest = rest.replace("conv_shortcut", "nin_shortcut")
                r.move(key, f"{stage}.block.{m['res']}.{rest}")
            else:
                sampler = "downsample" if m["sampler"] == "downsamplers" else "upsample"
                r.move(key, f"{stage}.{sampler}.{rest}")
        elif m["mid_res"] is not None:
            rest = rest.replace("conv_shortcut", "nin_shortcut")
            r.move(key, f"{side}.mid.block_{int(m['mid_res']) + 1}.{rest}")
        else:
            tensor = r.take(key)
            if tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
            r.out[f"{side}.mid.attn_1.{_VAE_ATTENTION[m['attn']]}.{rest}"] = tensor
    return r.finish()


def clip_to_original(state: Mapping[str, torch.Tensor], *, keep_projection: bool) -> dict[str, torch.Tensor]:
    """transformers CLIP text-model keys -> the `text_model.*` keys SD3 files carry.

    SD3 files keep CLIP in Hugging Face's own layout. CLIP-L is stored *without* its projection:
    SD3 pools CLIP-L un-projected, so Stability's files (and ComfyUI when it saves) leave the matrix
    out, and diffusers puts the identity in its place on loading. CLIP-G keeps its projection.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith("position_ids"):
            continue  # a buffer of arange(77), not a weight; newer transformers do not save it at all
        if key.startswith("text_projection."):
            if keep_projection:
                out[key] = tensor
            continue
        # transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level); the files keep the level.
        out[key if key.startswith("text_model.") else f"text_model.{key}"] = tensor
    return out


def t5_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers `T5EncoderModel` keys, less the encoder's copy of the tied input embedding.

    `encoder.embed_tokens.weight` is the same tensor as `shared.weight`; the files store it once
    (and safetensors cannot store one tensor under two names).
    """
    return {k: v for k, v in state.items() if k != "encoder.embed_tokens.weight"}


def _is_identity(weight: torch.Tensor) -> bool:
    rows, cols = weight.shape
    return rows == cols and torch.equal(weight.float(), torch.eye(rows, device=weight.device))


def single_file_state(
    pipe: Any, *, include_t5: bool = True, include_clips: bool = True
) -> dict[str, torch.Tensor]:
    """The whole original-layout state dict of a `StableDiffusion3Pipeline`, prefixes included."""
    out: dict[str, torch.Tensor] = {}

    def add(prefix: str, part: Mapping[str, torch.Tensor]) -> None:
        out.update((prefix + k, v) for k, v in part.items())

    add(TRANSFORMER_PREFIX, transformer_to_original(pipe.transformer.state_dict()))
    add(VAE_PREFIX, vae_to_original(pipe.vae.state_dict()))
    if include_clips:
        projection = pipe.text_encoder.text_projection.weight
        if not projection.is_meta and not _is_identity(projection):
            # The file has no place for it: loaders put the identity back, which is what SD3 uses anyway.
            log.warning("CLIP-L text_projection is not the identity; it is not written (SD3 does not use it)")
        add(CLIP_L_PREFIX, clip_to_original(pipe.text_encoder.state_dict(), keep_projection=False))
        add(CLIP_G_PREFIX, clip_to_original(pipe.text_encoder_2.state_dict(), keep_projection=True))
    if include_t5:
        if pipe.text_encoder_3 is None:
            raise ValueError("the pipeline has no T5 encoder to write; export with include_t5=False")
        add(T5_PREFIX, t5_to_original(pipe.text_encoder_3.state_dict()))
    return out


# -- writing ---------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def _as_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def write_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: Path,
    *,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write `tensors` as a safetensors file, one tensor at a time (floating ones cast to `dtype`).

    `safetensors.torch.save_file` first turns every tensor into bytes and only then writes, which
    for SD3 Medium with T5 (15 GB in fp16) needs a second 15 GB of RAM on top of the loaded model.
    The format is simple enough to stream: an 8-byte little-endian header length, a JSON header
    of dtype/shape/byte range per tensor, then the raw little-endian bytes in the header's order.
    """

    def stored_dtype(tensor: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype

    names = sorted(tensors)
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name in names:
        tensor = tensors[name]
        target = stored_dtype(tensor)
        if target not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {target} cannot be stored in safetensors")
        size = tensor.numel() * target.itemsize
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[target],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the reference writer aligns the data start to 8 bytes
    if sys.byteorder != "little":
        raise RuntimeError("safetensors stores little-endian data; this writer does not byte-swap")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    # Written under another name and renamed at the end, so an interrupted export never leaves a
    # truncated file with the real name for a server to trip over later.
    with partial.open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name in names:
            tensor = tensors[name]
            f.write(_as_bytes(tensor.to(stored_dtype(tensor))))
    partial.replace(path)


def export_single_file(
    pipe: Any,
    path: Path,
    *,
    include_t5: bool = True,
    include_clips: bool = True,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `pipe` (a `StableDiffusion3Pipeline`) as one original-layout safetensors file.

    With `include_t5=False` the result is the layout of `sd3_medium_incl_clips.safetensors`; with
    both flags it is `sd3_medium_incl_clips_t5xxlfp16.safetensors`. The weights keep the dtype each
    has in `pipe` unless `dtype` is given; give it when converting an fp16 pipeline, because
    transformers keeps T5's `wo` layers in fp32 when loading in fp16, and Stability's files are
    fp16 throughout. Returns `path`.
    """
    path = Path(path)
    state = single_file_state(pipe, include_t5=include_t5, include_clips=include_clips)
    write_safetensors(state, path, metadata={"written_by": "sd3-server pipelines.checkpoints"}, dtype=dtype)
    return path


# -- reading ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SingleFileContents:
    """Which SD3 parts a single-file checkpoint holds, read from its key names alone."""

    keys: frozenset[str]

    def _any(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.keys)

    @property
    def is_sd3(self) -> bool:
        # The MMDiT's joint blocks, with or without the `model.diffusion_model.` prefix (diffusers
        # accepts both, as transformer-only files are saved bare).
        return any(re.match(r"^(model\.diffusion_model\.)?joint_blocks\.0\.", k) for k in self.keys)

    @property
    def structure(self) -> dict[str, Any]:
        """The transformer-config entries the family rule reads (`pipelines.families`), from the keys.

        qk-norm leaves `attn.ln_q`/`ln_k` weights in every block; MMDiT-X's second attention leaves
        `x_block.attn2.*` in the blocks that have one. Read from names, not from depth or widths, so a
        tiny twin's file is told apart by the same rule as Stability's.
        """
        dual = sorted(
            {int(m[1]) for k in self.keys if (m := re.search(r"joint_blocks\.(\d+)\.x_block\.attn2\.", k))}
        )
        qk_norm = any(re.search(r"joint_blocks\.\d+\.x_block\.attn\.ln_q\.", k) for k in self.keys)
        return {"qk_norm": "rms_norm" if qk_norm else None, "dual_attention_layers": tuple(dual)}

    @property
    def family(self) -> Family:
        """`sd3-medium`, `sd3.5-large` or `sd3.5-medium` (Large Turbo has Large's keys)."""
        return structural_family(self.structure)

    @property
    def variant(self) -> str:
        """The family as diffusers names it (`sd3`, `sd35_large`, `sd35_medium`)."""
        return {"sd3-medium": "sd3", "sd3.5-medium": "sd35_medium"}.get(self.family, "sd35_large")

    @property
    def has_vae(self) -> bool:
        return self._any(VAE_PREFIX) or self._any("vae.")

    @property
    def has_clip_l(self) -> bool:
        return self._any(CLIP_L_PREFIX)

    @property
    def has_clip_g(self) -> bool:
        return self._any(CLIP_G_PREFIX)

    @property
    def has_t5(self) -> bool:
        return f"{T5_PREFIX}shared.weight" in self.keys  # the key diffusers tests for, too

    @property
    def has_text_encoders(self) -> bool:
        # Stability ships SD3.5 (and plain sd3_medium.safetensors) as MMDiT + VAE only.
        return self.has_clip_l or self.has_clip_g or self.has_t5

    def looks_like(self) -> str | None:
        """A guess at what a non-SD3 checkpoint is, for the error message."""
        probes = (
            ("double_blocks.0.", "a FLUX checkpoint"),
            ("input_blocks.0.0.weight", "a UNet (Stable Diffusion 1.x/2.x/XL) checkpoint"),
            ("transformer_blocks.0.attn.to_q.weight", "a diffusers-format transformer, not an original file"),
        )
        for needle, name in probes:
            if any(needle in k for k in self.keys):
                return name
        return None


def _torch_checkpoint_keys(path: Path) -> Iterable[str]:
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:
        # mmap needs the zip format of torch >= 1.6; old pickles must be read whole.
        state = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return list(state)


def inspect_single_file(path: Path) -> SingleFileContents:
    """Read a checkpoint's key names (the safetensors header only; `.ckpt` files are memory-mapped)."""
    path = Path(path)
    if path.suffix.lower() in {".safetensors", ".sft"}:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys: Iterable[str] = list(f.keys())
    else:
        keys = _torch_checkpoint_keys(path)
    return SingleFileContents(frozenset(keys))


# -- the converter users run -----------------------------------------------------------------------


def _iter_prefixes(keys: Iterable[str]) -> Iterator[tuple[str, int]]:
    prefixes = (TRANSFORMER_PREFIX, VAE_PREFIX, CLIP_L_PREFIX, CLIP_G_PREFIX, T5_PREFIX)
    keys = list(keys)
    for prefix in prefixes:
        yield prefix, sum(k.startswith(prefix) for k in keys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sd3-convert",
        description="Write a diffusers SD3 or SD3.5 folder as one single-file checkpoint in the original "
        "(Stability/ComfyUI) key layout.",
    )
    parser.add_argument(
        "diffusers_dir", type=Path, help="a folder written by save_pretrained (model_index.json)"
    )
    parser.add_argument("output", type=Path, help="the .safetensors file to write")
    leave_out = parser.add_mutually_exclusive_group()
    leave_out.add_argument(
        "--no-t5", action="store_true", help="leave T5-XXL out (like sd3_medium_incl_clips)"
    )
    leave_out.add_argument(
        "--no-text-encoders",
        action="store_true",
        help="MMDiT and VAE only, as Stability ships SD3.5 (sd3.5_large.safetensors)",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(_DTYPES),
        default="fp16",
        help="precision of the written weights (default fp16, as Stability's files)",
    )
    args = parser.parse_args(argv)

    from diffusers import StableDiffusion3Pipeline

    if not (args.diffusers_dir / "model_index.json").is_file():
        parser.error(f"{args.diffusers_dir} is not a diffusers folder (it has no model_index.json)")
    if args.output.suffix.lower() != ".safetensors":
        parser.error("the output must end in .safetensors")
    # Not loading what is left out saves its RAM (9.5 GB for T5) and its read time.
    left_out = ["text_encoder_3", "tokenizer_3"] if args.no_t5 or args.no_text_encoders else []
    if args.no_text_encoders:
        left_out += ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]
    extra: dict[str, Any] = dict.fromkeys(left_out)
    pipe = StableDiffusion3Pipeline.from_pretrained(args.diffusers_dir, dtype=_DTYPES[args.dtype], **extra)
    try:
        export_single_file(
            pipe,
            args.output,
            include_t5=not (args.no_t5 or args.no_text_encoders),
            include_clips=not args.no_text_encoders,
            dtype=_DTYPES[args.dtype],
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    written = inspect_single_file(args.output)
    counts = ", ".join(f"{prefix}* {n}" for prefix, n in _iter_prefixes(written.keys) if n)
    size = args.output.stat().st_size
    shown = f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
    print(f"wrote {args.output} ({shown}; tensors: {counts})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
