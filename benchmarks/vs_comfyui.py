"""Ours vs ComfyUI's own sampling vs a stock diffusers StableDiffusion3Pipeline, one run (issue 16).

    python benchmarks/vs_comfyui.py --comfyui /path/to/ComfyUI [--model auto|toy|random:DEPTH|DIR]
        [--size 512] [--steps 20] [--cfg 5] [--repeats 5] [--threads 1]
        [--cases euler:simple euler:normal dpmpp_2m:sgm_uniform] [--negative plain|window]
        [--comfy-args "--cpu"]

Three contenders on one small SD3 (the same weights, the same text conditioning, the same VAE):
  1. ours: `SD3Generator.generate` (pipelines/sd3.py), our own ComfyUI-math loop;
  2. ComfyUI: the transformer loaded into ComfyUI's own model classes from its Stability-layout state
     dict (`comfy.sd.load_diffusion_model_state_dict`, detected as `comfy.model_base.SD3`), sampled by
     `comfy.sample.sample` (KSampler) with `comfy.sample.prepare_noise`'s noise and ModelSamplingSD3's
     shift; the latent it returns decoded by our VAE;
  3. diffusers: the stock `StableDiffusion3Pipeline` on the same components, given the same prompt
     embeddings, with its own FlowMatchEulerDiscreteScheduler (whatever the case's sampler).
ComfyUI's text encoders are bypassed: the tiny CLIP/T5 widths do not fit its fixed configs, so all
three sides get OUR encoding of the prompts (`SD3Generator.encode`; cached on our side, computed once
for the other two), and every timing is sampling + VAE decode.

ComfyUI is not on PyPI: pass a checkout of https://github.com/Comfy-Org/ComfyUI with `--comfyui`;
it is imported from there at run time (nothing of it is copied here). benchmarks/README.md says
which commit was measured and which extra packages it needs. Contenders are interleaved (ours,
ComfyUI, diffusers, ours, ...) so that the machine's noise hits all alike; medians and per-round
ratios are printed, and the PSNR of the images against ours (parity: ComfyUI's should be near
identical, diffusers' only on `euler:normal`, which is its scheduler's schedule; docs/sampling.md §11).
"""

from __future__ import annotations

import argparse
import copy
import importlib.abc
import importlib.machinery
import logging
import math
import os
import shlex
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

PROMPT = "a red circle above a blue square on a grey background"
NEGATIVE = "bad quality, poor quality, blurry"
SEED = 468685
SD3_MEDIUM_DEPTH = 24


# -- ComfyUI --------------------------------------------------------------------------------------
class _PlaceholderModule(types.ModuleType):
    """Stands in for torchvision, which ComfyUI imports at module level for models other than SD3."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _PlaceholderModule(f"{self.__name__}.{name}")


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, root: str) -> None:
        self.root = root

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname == self.root or fullname.startswith(self.root + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> types.ModuleType:
        module = _PlaceholderModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def _torchvision_loads() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # not installed, or a build for another torch (its C ops then fail to register)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        return False
    return True


def check_comfyui_path(path: Path | None) -> Path:
    """The ComfyUI checkout to import, or exit saying where to get one."""
    if path is None:
        sys.exit(
            "vs_comfyui.py needs a ComfyUI checkout: pass --comfyui PATH. ComfyUI is on GitHub, not PyPI "
            "(https://github.com/Comfy-Org/ComfyUI); benchmarks/README.md says which commit was measured "
            "and which packages it needs beside this project's (einops)."
        )
    path = path.expanduser().resolve()
    if not (path / "comfy" / "samplers.py").is_file():
        sys.exit(f"--comfyui {path}: not a ComfyUI checkout (no comfy/samplers.py there).")
    return path


def import_comfyui(path: Path, comfy_args: list[str]) -> types.SimpleNamespace:
    """Import ComfyUI's model and sampling modules from a checkout, or exit saying what is missing."""
    # Appended, not prepended: ComfyUI's top level has a server.py that would shadow our `server`.
    sys.path.append(str(path))
    notes = []
    if not _torchvision_loads():
        # comfy.sd imports torchvision (Stable Cascade, Cosmos, ACE) at module level; the SD3 model and
        # sampler path never calls it. PyPI's torchvision wheels are CUDA builds whose ops do not load
        # beside a CPU torch, so a placeholder module is registered instead.
        sys.meta_path.insert(0, _PlaceholderFinder("torchvision"))
        notes.append("torchvision: placeholder module (not importable here; unused by SD3)")
    saved_argv = sys.argv
    sys.argv = [saved_argv[0], *comfy_args]  # ComfyUI parses its options from sys.argv when asked
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.ldm.modules.attention
        import comfy.model_base
        import comfy.model_management
        import comfy.sample
        import comfy.samplers
        import comfy.sd
    except ModuleNotFoundError as exc:
        sys.exit(
            f"ComfyUI at {path} needs the Python package '{exc.name}', which this environment lacks: "
            f"install it into a separate folder (pip install --target DIR {exc.name}) and put DIR on "
            "PYTHONPATH (benchmarks/README.md)."
        )
    finally:
        sys.argv = saved_argv
    attention = comfy.ldm.modules.attention.optimized_attention.__name__
    notes.append(f"attention: {attention}")
    return types.SimpleNamespace(
        model_base=comfy.model_base,
        model_management=comfy.model_management,
        sample=comfy.sample,
        samplers=comfy.samplers,
        sd=comfy.sd,
        notes=notes,
        path=path,
    )


def comfy_commit(path: Path) -> str:
    for name in ("COMMIT.txt", ".git/HEAD"):
        f = path / name
        if f.is_file():
            text = f.read_text().strip()
            if text.startswith("ref: "):
                ref = path / ".git" / text.removeprefix("ref: ")
                text = ref.read_text().strip() if ref.is_file() else text
            return text.split()[0] if text else "unknown"
    return "unknown (no .git or COMMIT.txt in the checkout)"


def load_comfy_model(comfy: types.SimpleNamespace, transformer: Any, shift: float) -> Any:
    """Our diffusers transformer in ComfyUI's own SD3 classes, from its Stability-layout state dict, its
    weights in our dtype (ComfyUI then computes as it decides: on a CPU always fp32, casting bf16
    weights layer by layer, `comfy.model_management.should_use_bf16`)."""
    from pipelines.checkpoints import TRANSFORMER_PREFIX, transformer_to_original

    original = transformer_to_original(transformer.state_dict())
    # No copy: ComfyUI copies into its own model (at SD3 Medium's size a third fp32 copy of 8 GB
    # would not fit this machine beside ours and ComfyUI's).
    state = {TRANSFORMER_PREFIX + k: v.detach() for k, v in original.items()}
    patcher = comfy.sd.load_diffusion_model_state_dict(state, model_options={"dtype": transformer.dtype})
    del state, original
    if patcher is None or not isinstance(patcher.model, comfy.model_base.SD3):
        found = "nothing" if patcher is None else type(patcher.model).__name__
        sys.exit(
            f"ComfyUI's model detection did not recognise the transformer as SD3 (it found {found}): "
            "the model must follow SD3's width rule (hidden = 64 x depth, heads of 64)."
        )
    # What the ModelSamplingSD3 node does, through ComfyUI's own objects: a clone of the model
    # patched with a flow (CONST) model sampling at `shift`, multiplier 1000.
    model_sampling = copy.deepcopy(patcher.get_model_object("model_sampling"))
    model_sampling.set_parameters(shift=shift, multiplier=1000)
    patched = patcher.clone()
    patched.add_object_patch("model_sampling", model_sampling)
    return patched


# -- the model ------------------------------------------------------------------------------------
def build_pipeline(model: str) -> tuple[Any, str]:
    """A float32 StableDiffusion3Pipeline whose transformer ComfyUI's detection reads as SD3."""
    from diffusers import StableDiffusion3Pipeline

    import pipelines.toy

    if model == "auto":
        model = "toy" if (pipelines.toy.MODEL_DIR / "model_index.json").is_file() else "random:4"
    if model == "toy" or Path(model).is_dir():
        folder = pipelines.toy.folder_of(model)
        if not (folder / "model_index.json").is_file():
            sys.exit(
                f"--model {model}: no diffusers folder at {folder} (train the toy, or use random:DEPTH)."
            )
        pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
        depth = pipe.transformer.config.num_layers
        return pipe, f"{folder} (depth {depth}, hidden {64 * depth})"
    if not model.startswith("random:"):
        sys.exit(f"--model {model}: use auto, toy, random:DEPTH, random:sd3-medium or a diffusers folder.")
    name = model.removeprefix("random:")
    depth = SD3_MEDIUM_DEPTH if name == "sd3-medium" else int(name)
    from pipelines.tiny import build_tiny_pipeline
    from pipelines.toy.train import TrainConfig, build_transformer

    pipe = build_tiny_pipeline()  # its tiny CLIP-L/G + T5, tokenizers and 8x VAE
    transformer = build_transformer(
        TrainConfig(depth=depth),
        joint_attention_dim=pipe.text_encoder_3.config.d_model,
        pooled_dim=pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.projection_dim,
    ).eval()
    pipe.register_modules(transformer=transformer)
    params = sum(p.numel() for p in transformer.parameters()) / 1e6
    what = "SD3 Medium's transformer shape" if name == "sd3-medium" else f"depth {depth}"
    return pipe, (
        f"random-weight transformer, {what} (hidden {64 * depth}, {depth} heads of 64, {params:.1f} M "
        "parameters) on the tiny model's text encoders and VAE"
    )


# -- measuring ------------------------------------------------------------------------------------
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """diffusers' [0, 1] float image → uint8, truncated as ours and ComfyUI's are (docs/sampling.md §9)."""
    return (255.0 * np.clip(pixels, 0.0, 1.0)).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--comfyui", type=Path, default=None, help="a ComfyUI checkout (GitHub, not PyPI)")
    parser.add_argument("--comfy-args", default="--cpu", help="ComfyUI's own command-line options")
    parser.add_argument(
        "--model",
        default="auto",
        help="auto (toy if trained, else random:4), toy, random:DEPTH, random:sd3-medium, "
        "or a diffusers folder",
    )
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--shift", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="the weights' precision on all three sides (bf16: ours' default on a CPU with native bf16)",
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["euler:simple", "euler:normal", "dpmpp_2m:sgm_uniform"],
        help="SAMPLER:SCHEDULE pairs in ComfyUI's names, run by ours and ComfyUI alike",
    )
    parser.add_argument(
        "--negative",
        choices=("plain", "window"),
        default="plain",
        help="plain: the negative guides every step (all three sides). window: the API default (real "
        "negative on [0, 0.1], zero-out on [0.1, 1]; ours and ComfyUI only, diffusers stays plain)",
    )
    args = parser.parse_args()
    if args.size % 16:
        parser.error("--size must be a multiple of 16 (SD3's 2x2 patches of an 8x latent)")

    comfyui = check_comfyui_path(args.comfyui)
    torch.set_num_threads(args.threads)

    from pipelines.loading import LoadedModel
    from pipelines.request import GenerationRequest
    from pipelines.sd3 import SD3Generator

    # Our side (and diffusers, transformers) first: their optional-package checks must have run
    # before ComfyUI's import may register the torchvision placeholder.
    t0 = time.perf_counter()
    pipe, description = build_pipeline(args.model)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    pipe.to(dtype)
    pipe.set_progress_bar_config(disable=True)
    generator = SD3Generator(
        LoadedModel(pipe=pipe, device=torch.device("cpu"), dtype=dtype, description=description)
    )
    comfy = import_comfyui(comfyui, shlex.split(args.comfy_args))
    logging.getLogger().setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    comfy_model = load_comfy_model(comfy, pipe.transformer, args.shift)
    print(f"model: {description}; built and loaded into ComfyUI in {time.perf_counter() - t0:.1f} s")
    print(
        f"ComfyUI: {comfy.path} at {comfy_commit(comfy.path)}; options {args.comfy_args!r}; "
        f"{'; '.join(comfy.notes)}"
    )
    if args.model == "random:sd3-medium" and args.size >= 512:
        print(
            "note: SD3 Medium's 2 B-parameter transformer takes minutes per forward "
            "on one CPU thread at 512 px"
        )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs, "
        "load average "
        f"{os.getloadavg()[0]:.2f}; {args.size}x{args.size}, {args.steps} steps, CFG {args.cfg}, shift "
        f"{args.shift}, seed {args.seed}, negative {args.negative}, {args.repeats} rounds after one warm-up, "
        f"weights in {args.dtype}"
    )

    with torch.inference_mode():
        positive, negative = generator.encode(PROMPT), generator.encode(NEGATIVE)
    vae = pipe.vae
    scaling, vae_shift = vae.config.scaling_factor, vae.config.shift_factor
    latent_shape = (1, 16, args.size // 8, args.size // 8)
    window = args.negative == "window"
    comfy_positive = [[positive.context, {"pooled_output": positive.pooled}]]
    if window:
        # ConditioningSetTimestepRange on the negative and on its ConditioningZeroOut, combined: what
        # the SD3 workflow (and our API default, docs/sampling.md §5.2) wires.
        comfy_negative = [
            [negative.context, {"pooled_output": negative.pooled, "start_percent": 0.0, "end_percent": 0.1}],
            [
                torch.zeros_like(negative.context),
                {
                    "pooled_output": torch.zeros_like(negative.pooled),
                    "start_percent": 0.1,
                    "end_percent": 1.0,
                },
            ],
        ]
    else:
        comfy_negative = [[negative.context, {"pooled_output": negative.pooled}]]

    def ours_fn(sampler: str, schedule: str) -> Callable[[], np.ndarray]:
        request = GenerationRequest(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            scheduler=sampler,
            schedule=schedule,
            steps=args.steps,
            guidance_scale=args.cfg,
            seed=args.seed,
            width=args.size,
            height=args.size,
            shift=args.shift,
            negative_window=window,  # False: plain CFG on every step (plain_negative)
            cond_start=0.1,
            cond_stop=1.0,
        )
        return lambda: generator.generate(request).images[0]

    def comfy_fn(sampler: str, schedule: str) -> Callable[[], np.ndarray]:
        def run() -> np.ndarray:
            latent = torch.zeros(latent_shape)
            noise = comfy.sample.prepare_noise(latent, args.seed)
            z = comfy.sample.sample(
                comfy_model,
                noise,
                args.steps,
                args.cfg,
                sampler,
                schedule,
                comfy_positive,
                comfy_negative,
                latent,
                denoise=1.0,
                disable_pbar=True,
                seed=args.seed,
            )
            # ComfyUI hands back the VAE-space latent (process_latent_out); ours decodes model space.
            with torch.inference_mode():
                return generator.decode((z.float() - vae_shift) * scaling)[0]

        return run

    def diffusers_fn() -> np.ndarray:
        with torch.inference_mode():
            out = pipe(
                prompt_embeds=positive.context,
                pooled_prompt_embeds=positive.pooled,
                negative_prompt_embeds=negative.context,
                negative_pooled_prompt_embeds=negative.pooled,
                height=args.size,
                width=args.size,
                num_inference_steps=args.steps,
                guidance_scale=args.cfg,
                generator=torch.Generator().manual_seed(args.seed),
                output_type="np",
            )
        return to_uint8(out.images[0])

    names = ("ours", "ComfyUI", "diffusers")
    rows = []
    for case in args.cases:
        sampler, _, schedule = case.partition(":")
        if schedule not in comfy.samplers.SCHEDULER_NAMES or sampler not in comfy.samplers.SAMPLER_NAMES:
            sys.exit(f"--cases {case}: ComfyUI knows no sampler {sampler!r} or schedule {schedule!r}")
        fns = dict(
            zip(names, (ours_fn(sampler, schedule), comfy_fn(sampler, schedule), diffusers_fn), strict=True)
        )
        images = {name: fn() for name, fn in fns.items()}  # warm-up, and the images compared
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(args.repeats):
            order = names[r % 3 :] + names[: r % 3]  # rotate who goes first
            for name in order:
                start = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) for name, t in times.items()}
        ratio_c = statistics.median(o / c for o, c in zip(times["ours"], times["ComfyUI"], strict=True))
        ratio_d = statistics.median(o / d for o, d in zip(times["ours"], times["diffusers"], strict=True))
        diff_c = int(np.abs(images["ours"].astype(int) - images["ComfyUI"].astype(int)).max())
        rows.append(
            (
                case,
                med["ours"],
                med["ComfyUI"],
                med["diffusers"],
                ratio_c,
                ratio_d,
                psnr(images["ours"], images["ComfyUI"]),
                diff_c,
                psnr(images["ours"], images["diffusers"]),
            )
        )
        print(f"  {case}: done ({', '.join(f'{n} {med[n]:.2f} s' for n in names)})", flush=True)

    print(
        f"\nmedians of {args.repeats} rounds, seconds (sampling + VAE decode); "
        "ratios: median of per-round ratios"
    )
    print(
        "| sampler:schedule | ours | ComfyUI | diffusers (FlowMatch Euler) | ours/ComfyUI | ours/diffusers "
        "| PSNR ours vs ComfyUI (max px diff) | PSNR ours vs diffusers |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for case, o, c, d, rc, rd, pc, dc, pd in rows:
        print(
            f"| {case} | {o:.2f} | {c:.2f} | {d:.2f} | {rc:.3f} | {rd:.3f} "
            f"| {pc:.1f} dB ({dc}) | {pd:.1f} dB |"
        )
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
