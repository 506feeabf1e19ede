"""The few-step distillation of the trained toy (pipelines/toy/distill.py): reproducible, its
guidance teacher is the serving loop's CFG to float rounding, its phased targets are the steps the
served few-step request takes, and its LoRA is one the server merges. The committed 4- and 10-step
LoRAs (`pipelines/toy/few-step-4`, `few-step-10`) are checked against the committed toy and, pair
by pair on 12 pairs, against plain CFG at the same work; their figures over 100 pairs are `python
benchmarks/quality.py --only few-step --lora DIR`'s (docs/toy.md §15, §17, §35–40).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import pipelines.toy
import pipelines.toy.train
import schedulers
from pipelines.request import GenerationRequest
from pipelines.sd3 import Conditioning, SD3Generator
from pipelines.toy import distill, quality
from pipelines.toy.train import CaptionBank, file_sha256, velocity
from schedulers.guidance import guided_denoiser
from server.config import Settings
from server.image_input import InputImage
from server.pricing import model_evaluations
from server.runtime import load_runtime
from server.schemas import Img2ImgRequest, Txt2ImgRequest
from server.serving import img2img_generation_request, to_generation_request

pytestmark = pytest.mark.skipif(
    not (pipelines.toy.MODEL_DIR / "model_index.json").exists(),
    reason="the toy's weights are not in this checkout (python -m pipelines.toy.train pipelines/toy/model)",
)


def _load(tmp: Path, lora: list[str]) -> SD3Generator:
    settings = Settings(
        data_dir=tmp,
        model={"id": "toy", "device": "cpu", "dtype": "fp32", "lora": lora},
        memory={"mode": "device", "vae_tiling": "off", "attention_slicing": "off"},
    )
    generator = load_runtime(settings).generator
    assert isinstance(generator, SD3Generator)
    return generator


@pytest.mark.slow
def test_a_distillation_is_reproducible_reuses_its_teacher_pairs_and_serves_through_lora(
    tmp_path: Path,
) -> None:
    cfg = distill.DistillConfig(pairs=3, size=32, steps=3, batch=2, warmup=1)
    logs: list[str] = []
    first = distill.distill(cfg, tmp_path / "a", log=logs.append)
    assert any(line.startswith("teacher pairs 3/3") for line in logs)
    weights = tmp_path / "a" / distill.WEIGHT_NAME
    assert first["sha256"][distill.WEIGHT_NAME] == file_sha256(weights)

    # The same settings again, into the same folder: the cached pairs are read, the LoRA is the same
    # up to float rounding. Not bit for bit: about one rerun in five here differs in a last bit (the
    # CPU kernels' rounding is not fixed from run to run), so the hashes are not compared.
    before = load_file(weights)
    logs.clear()
    distill.distill(cfg, tmp_path / "a", log=logs.append)
    assert any(line.startswith("teacher pairs read") for line in logs)
    after = load_file(weights)
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        torch.testing.assert_close(after[name], tensor, rtol=1e-2, atol=1e-6)

    # Other pair settings do not reuse pairs made for different ones.
    logs.clear()
    distill.distill(replace(cfg, pairs=2), tmp_path / "a", log=logs.append)
    assert any(line.startswith("teacher pairs 2/2") for line in logs)

    # The folder is a LoRA the server merges at start-up, and it moves the weights.
    base = _load(tmp_path / "base", [])
    merged = _load(tmp_path / "merged", [str(tmp_path / "a")])
    before = base.pipe.transformer.state_dict()
    after = merged.pipe.transformer.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved and all(k.endswith(".weight") and "transformer_blocks" in k for k in moved)


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ({"pairs": 0}, "pairs must be at least 1"),
        ({"steps": -1}, "steps must be at least 1"),
        ({"batch": 0}, "batch must be at least 1"),
        ({"rank": 0}, "rank must be at least 1"),
        ({"threads": 0}, "threads must be at least 1"),
        ({"warmup": -1}, "must not be negative"),
        ({"size": 100}, "multiple of 16"),
        ({"size": 0}, "multiple of 16"),
        ({"lr": math.nan}, "positive and finite"),
        ({"lr": 0.0}, "positive and finite"),
        ({"shift": math.inf}, "positive and finite"),
        ({"at_one": 1.5}, "at_one is a share"),
        ({"pool": 0}, "pool must be at least 1"),
        ({"method": "progressive"}, "method must be one of"),
        ({"extra_sizes": (512,)}, "reflow's pairs have one size"),
        ({"method": "guidance", "extra_sizes": (500,)}, "multiple of 16"),
        ({"method": "phased", "phases": 0}, "phases must be at least 1"),
        ({"method": "phased", "extra_sizes": (256,)}, "each size is trained once"),  # the first again
        ({"method": "phased", "student_states": 1.5}, "student_states is a share"),
        ({"method": "phased", "student_states": math.nan}, "student_states is a share"),
        ({"student_states": 0.5}, "student states are for --method phased"),  # reflow takes no steps
        ({"init": "no-such-lora"}, "--init names a folder"),
    ],
)
def test_settings_that_cannot_train_are_refused_before_any_work(bad: dict[str, float], why: str) -> None:
    # Each by its own reason: a setting refused for another one would hide a missing check.
    with pytest.raises(ValueError, match=re.escape(why)):
        distill.DistillConfig(**bad)  # type: ignore[arg-type]


def test_cached_teacher_pairs_serve_under_either_name_and_only_at_their_own_key_and_sigmas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[int] = []

    def teacher(cfg: distill.DistillConfig, generator: object, log: object) -> dict[str, object]:
        # Only the caching is under test here: the slow tests run the real teacher.
        made.append(cfg.size)
        return {"key": cfg.pair_key(), "sigmas": distill.student_sigmas(cfg.size, cfg.phases)}

    monkeypatch.setattr(distill, "teacher_pairs", teacher)
    two = distill.DistillConfig(method="phased", phases=2, pairs=4, size=32, extra_sizes=(64,))
    at_64 = two.at_size(64)
    # A run at 64 px alone leaves teacher-pairs.pt; a run that adds 64 px to 32 reads it back.
    distill._cached_pairs(at_64, tmp_path, distill.PAIRS_FILE, None, print)  # type: ignore[arg-type]
    distill._cached_pairs(at_64, tmp_path, distill.pairs_file(two, 64), None, print)  # type: ignore[arg-type]
    assert made == [64] and not list(tmp_path.glob("*.partial"))
    # Other phases or pairs at 64 px key other pairs; states at other σ's are run again too.
    assert at_64.pair_key() not in (
        replace(two, phases=3).at_size(64).pair_key(),
        replace(two, pairs=8).at_size(64).pair_key(),
    )
    stale = torch.load(tmp_path / distill.PAIRS_FILE) | {"sigmas": distill.student_sigmas(64, 3)[1:]}
    torch.save(stale, tmp_path / distill.PAIRS_FILE)
    distill._cached_pairs(at_64, tmp_path, distill.pairs_file(two, 64), None, print)  # type: ignore[arg-type]
    assert made == [64, 64] and torch.load(tmp_path / "teacher-pairs-64.pt")["key"] == at_64.pair_key()


def test_the_command_line_turns_a_refused_setting_into_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        distill.main(["out", "--pairs", "0"])
    assert exit_.value.code == 2
    assert "pairs must be at least 1" in capsys.readouterr().err


def test_teacher_pairs_are_keyed_by_the_teacher_s_contents_not_its_path(tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(pipelines.toy.MODEL_DIR, moved)
    cfg = distill.DistillConfig()
    assert replace(cfg, model=str(moved)).pair_key() == cfg.pair_key()
    weights = next((moved / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b" ")
    assert replace(cfg, model=str(moved)).pair_key() != cfg.pair_key()


def test_the_guidance_teacher_is_the_serving_loop_s_cfg_at_each_sample_s_own_sigma() -> None:
    """What the guidance method fits is what `SD3Generator` computes at the API's defaults: CFG 5, the
    negative prompt above the hosted window's σ and the zeroed-out one below it, one σ per row."""
    generator = distill.load_generator(str(pipelines.toy.MODEL_DIR))
    ranges = generator.negative_ranges(distill.teacher_request(64))
    window = next(r for r in ranges if r.name == "negative").sigma_end
    assert 0.9 < window < 1.0  # the first tenth of the defaults' sampling, in σ
    bank = CaptionBank(generator.pipe)
    positive = bank.get(
        [
            "a red circle on a blue background",
            "a green square on a white background",
            "a blue triangle on a black background",
        ]
    )
    negative = (bank.empty_context[None], bank.empty_pooled[None])
    x = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    # σ = 1 and just above the window use the negative prompt; below it, the zeroed-out one.
    sigma = torch.tensor([1.0, window + 0.01, window - 0.3])
    with torch.no_grad():
        guided = distill.guided_velocity(
            generator.pipe.transformer, x, sigma, positive, negative, cfg=5.0, ranges=ranges
        )
        for row, s in enumerate(sigma.tolist()):
            conds = {
                "positive": Conditioning(positive[0][row : row + 1], positive[1][row : row + 1]),
                "negative": Conditioning(*negative),
                "zero": Conditioning(torch.zeros_like(negative[0]), torch.zeros_like(negative[1])),
            }
            denoise = guided_denoiser(generator._predictor(conds), cfg=5.0, ranges=ranges)
            denoised = denoise(x[row : row + 1], s)
            expected = (x[row : row + 1] - denoised) / s  # D = x − σ·v
            torch.testing.assert_close(guided[row : row + 1], expected, rtol=1e-4, atol=1e-4)
        # Plain guidance 1 is not what it fits: the target really is the guided field.
        plain = velocity(generator.pipe.transformer, x, sigma, *positive)
        assert (guided - plain).abs().mean() > 0.1 * plain.abs().mean()


@pytest.mark.slow
def test_a_guidance_distillation_at_two_sizes_is_reproducible_and_serves_through_lora(tmp_path: Path) -> None:
    cfg = distill.DistillConfig(
        method="guidance", size=32, extra_sizes=(64,), steps=4, batch=4, pool=8, warmup=1
    )
    assert [cfg.batch_at(s) for s in cfg.sizes] == [4, 1]
    logs: list[str] = []
    manifest = distill.distill(cfg, tmp_path / "a", log=logs.append)
    assert any(line.startswith("pool 64 px: 2 scenes") for line in logs)
    assert manifest["student"] == "guidance 1, any sampler"
    weights = tmp_path / "a" / distill.WEIGHT_NAME
    assert manifest["sha256"][distill.WEIGHT_NAME] == file_sha256(weights)
    distill.distill(cfg, tmp_path / "b", log=logs.append)
    first, again = load_file(weights), load_file(tmp_path / "b" / distill.WEIGHT_NAME)
    for name, tensor in first.items():
        torch.testing.assert_close(again[name], tensor, rtol=1e-2, atol=1e-6)
    # The LoRA moved away from its zero start, and the server merges it.
    assert any(t.abs().max() > 0 for n, t in first.items() if "lora_B" in n)
    merged = _load(tmp_path / "merged", [str(tmp_path / "a")])
    request = distill.student_request(64, 2)
    assert merged.generate(request).images[0].shape == (64, 64, 3)


def test_phased_targets_are_the_steps_the_served_few_step_request_takes() -> None:
    """A student that gave the phased secants exactly would reach the teacher's final latent by the
    served few-step request's own Euler loop: the σ's it is taught at are the ones the server runs,
    and the secant is a velocity in the sign the samplers use."""
    generator = distill.load_generator(str(pipelines.toy.MODEL_DIR))
    served = distill.student_sigmas(64, 3)
    requests = [
        replace(distill.teacher_request(64), prompt="a red circle on a blue background", seed=seed)
        for seed in (5, 6)
    ]
    states = generator.sample_trajectory(requests, served.tolist())
    sigmas = served.tolist()

    def secant(x: torch.Tensor, sigma: float) -> torch.Tensor:
        k = sigmas.index(sigma)
        torch.testing.assert_close(x, states[:, k])  # the loop starts each step where the teacher was
        v = (states[:, k + 1] - states[:, k]) / (sigmas[k + 1] - sigmas[k])
        return x - sigma * v  # D = x − σ·v

    spec = distill.student_request(64, 3).sampling_spec()
    reached = schedulers.sample(spec.sampler, secant, states[:, 0], served)
    torch.testing.assert_close(reached, states[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [4, 10])
def test_the_few_step_baselines_are_the_lora_s_own_request_and_the_same_forwards_at_cfg(steps: int) -> None:
    def forwards(request: GenerationRequest) -> int:
        return model_evaluations(
            scheduler=request.scheduler, steps=request.steps, guidance_scale=request.guidance_scale
        )

    lora = distill.student_request(256, steps)
    baselines = distill.baseline_requests(256, steps)
    assert baselines["guidance 1"] == lora
    same_work = baselines["same work"]
    assert forwards(same_work) == forwards(lora) == steps
    assert same_work.guidance_scale == distill.teacher_request(256).guidance_scale == 5.0
    assert replace(same_work, steps=lora.steps, guidance_scale=1.0) == lora  # nothing else differs


class _SecantOracle(torch.nn.Module):
    """A stand-in transformer whose velocity for pair i at the k-th σ is that pair's k-th secant of
    `states` (the pair's index rides in its context), so the student's own steps retrace the states."""

    def __init__(self, states: torch.Tensor, sigmas: torch.Tensor) -> None:
        super().__init__()
        self.secants = (states[:, 1:] - states[:, :-1]) / (sigmas[1:] - sigmas[:-1]).view(-1, 1, 1, 1)
        self.sigmas = sigmas
        self.batches: list[int] = []

    def forward(
        self,
        *,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        **_: object,
    ) -> tuple[torch.Tensor]:
        self.batches.append(hidden_states.shape[0])
        k = [int(torch.argmin((1000.0 * self.sigmas - t).abs())) for t in timestep]
        pair = encoder_hidden_states[:, 0, 0].long().tolist()
        return (torch.stack([self.secants[i, j] for i, j in zip(pair, k, strict=True)]),)


def test_student_states_are_the_student_s_own_euler_steps_row_by_row() -> None:
    sigmas = distill.student_sigmas(32, 4)
    states = torch.randn(3, 5, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    oracle = _SecantOracle(states, sigmas)
    k = torch.tensor([3, 0, 2])
    context = torch.arange(3.0).view(3, 1, 1).expand(3, 2, 8)
    pooled = torch.zeros(3, 8)
    rolled = distill.rolled_states(oracle, states[:, 0], sigmas, k, context, pooled)
    torch.testing.assert_close(rolled, states[torch.arange(3), k])
    assert oracle.batches == [2, 2, 1]  # sum(k) row-forwards: a row leaves once it has its k steps
    unrolled = distill.rolled_states(oracle, states[1:2, 0], sigmas, k[1:2], context[1:2], pooled[1:2])
    assert torch.equal(unrolled, states[1:2, 0])


def test_a_student_started_from_a_saved_lora_is_that_lora() -> None:
    generator = distill.load_generator(str(pipelines.toy.MODEL_DIR))
    transformer = generator.pipe.transformer
    distill.add_lora(transformer, 32, seed=0)
    distill.load_init(transformer, pipelines.toy.FEW_STEP_DIR)
    saved = load_file(pipelines.toy.FEW_STEP_DIR / distill.WEIGHT_NAME)
    ours = dict(transformer.named_parameters())
    for name, tensor in saved.items():
        peft_name = name.removeprefix("transformer.").replace(".weight", ".default.weight")
        torch.testing.assert_close(ours[peft_name], tensor.float())
    other = distill.load_generator(str(pipelines.toy.MODEL_DIR)).pipe.transformer
    distill.add_lora(other, 16, seed=0)
    with pytest.raises(ValueError, match="rank"):
        distill.load_init(other, pipelines.toy.FEW_STEP_DIR)


@pytest.mark.slow
def test_a_phased_distillation_keys_its_pairs_by_its_phases_and_serves_through_lora(tmp_path: Path) -> None:
    cfg = distill.DistillConfig(method="phased", phases=2, pairs=3, size=32, steps=3, batch=2, warmup=1)
    logs: list[str] = []
    manifest = distill.distill(cfg, tmp_path / "a", log=logs.append)
    assert any(line.startswith("teacher pairs 3/3") for line in logs)
    assert manifest["student"].endswith("exactly 2 steps")
    assert manifest["student_sigmas"] == distill.student_sigmas(32, 2).tolist()
    pairs = torch.load(tmp_path / "a" / distill.PAIRS_FILE)
    assert pairs["states"].shape == (3, 3, 16, 4, 4)
    torch.testing.assert_close(pairs["states"][:, -1], pairs["x0"])
    # The same pairs serve a rerun; another step count needs its own teacher states.
    logs.clear()
    distill.distill(cfg, tmp_path / "a", log=logs.append)
    assert any(line.startswith("teacher pairs read") for line in logs)
    logs.clear()
    distill.distill(replace(cfg, phases=3), tmp_path / "a", log=logs.append)
    assert any(line.startswith("teacher pairs 3/3") for line in logs)
    assert torch.load(tmp_path / "a" / distill.PAIRS_FILE)["states"].shape[1] == 4
    # Reflow's key is what it was before the phased method, so its cached pairs still serve.
    assert "phases" not in distill.DistillConfig().pair_key()

    weights = load_file(tmp_path / "a" / distill.WEIGHT_NAME)
    assert any(t.abs().max() > 0 for n, t in weights.items() if "lora_B" in n)
    # Going on from that LoRA on the student's own states, into its own folder: the manifest names
    # the LoRA it started from, not the one that replaced it.
    started_from = file_sha256(tmp_path / "a" / distill.WEIGHT_NAME)
    on = replace(cfg, phases=3, init=str(tmp_path / "a"), student_states=1.0)
    tuned = distill.distill(on, tmp_path / "a", log=logs.append)
    assert tuned["init_sha256"] == started_from != tuned["sha256"][distill.WEIGHT_NAME]
    assert load_file(tmp_path / "a" / distill.WEIGHT_NAME).keys() == weights.keys()
    merged = _load(tmp_path / "merged", [str(tmp_path / "a")])
    assert merged.generate(distill.student_request(32, 3)).images[0].shape == (32, 32, 3)


@pytest.mark.slow
def test_a_phased_distillation_at_two_sizes_takes_each_size_s_own_teacher_states_in_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    single = distill.DistillConfig(method="phased", phases=2, pairs=4, size=32, steps=2, batch=4, warmup=1)
    distill.distill(single, tmp_path, log=lambda line: None)
    two = replace(single, extra_sizes=(64,), steps=4)
    assert (two.pairs_at(64), two.batch_at(64)) == (1, 1)  # as many pixels as at 32 px
    seen: list[tuple[int, ...]] = []
    real = pipelines.toy.train.velocity

    def recorded(transformer: object, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape))
        return real(transformer, x, *rest)

    monkeypatch.setattr(distill, "velocity", recorded)  # distill calls the name it imported
    logs: list[str] = []
    distill.distill(two, tmp_path, log=logs.append)
    # The first size's pairs are the single-size run's, read back; the second's are run for it.
    assert logs[0].startswith("teacher pairs read") and logs[1].startswith("teacher pairs 1/1 at 64 px")
    at_64 = torch.load(tmp_path / distill.pairs_file(two, 64))
    assert at_64["key"] == two.at_size(64).pair_key() and at_64["states"].shape == (1, 3, 16, 8, 8)
    torch.testing.assert_close(at_64["states"][:, -1], at_64["x0"])
    assert torch.load(tmp_path / distill.PAIRS_FILE)["key"] == single.pair_key()
    # Teacher forcing: one student forward a step, the sizes in turn at their own batches.
    assert seen[-4:] == [(4, 16, 4, 4), (1, 16, 8, 8)] * 2
    written = json.loads((tmp_path / "distill-manifest.json").read_text())
    assert written["config"]["extra_sizes"] == [64] and "seconds_per_pair_64" in written
    merged = _load(tmp_path / "merged", [str(tmp_path)])
    assert merged.generate(distill.student_request(64, 2)).images[0].shape == (64, 64, 3)


@pytest.mark.parametrize(
    ("folder", "steps"), [(pipelines.toy.FEW_STEP_DIR, 4), (pipelines.toy.FEW_STEP_10_DIR, 10)]
)
def test_a_committed_few_step_lora_was_distilled_from_the_committed_toy_for_the_served_steps(
    folder: Path, steps: int
) -> None:
    manifest = json.loads((folder / "distill-manifest.json").read_text())
    # Retraining the toy makes the LoRA stale: distil it again (docs/toy.md §35–37 have the commands).
    assert manifest["teacher_digest"] == distill.teacher_digest(pipelines.toy.MODEL_DIR)
    assert manifest["sha256"][distill.WEIGHT_NAME] == file_sha256(folder / distill.WEIGHT_NAME)
    assert manifest["config"]["phases"] == steps
    served = distill.student_sigmas(manifest["config"]["size"], steps)
    assert torch.equal(torch.tensor(manifest["student_sigmas"]), served)


def _documented_job(page: str) -> GenerationRequest:
    """The request README's few-step paragraph tells a client to send, as the server reads it."""
    if page == "txt2img":
        body = {
            "prompt": "a red circle",
            "scheduler": "Euler",
            "num_inference_steps": 10,
            "guidance_scale": 1,
        }
        return to_generation_request(
            Txt2ImgRequest.model_validate(body | {"img_width": 512, "img_height": 512}), seed=1
        )
    body = {"image": "x", "prompt": "a red circle", "sampler": "euler", "scheduler": "sgm_uniform"}
    fields = body | {"num_inference_steps": 4, "strength": 1, "guidance_scale": 1}
    image = InputImage(pixels=np.zeros((512, 512, 3), np.uint8), width=512, height=512)
    return img2img_generation_request(Img2ImgRequest.model_validate(fields), image, seed=1)


@pytest.mark.parametrize(("page", "folder"), [("txt2img", "FEW_STEP_10_DIR"), ("img2img", "FEW_STEP_DIR")])
def test_the_documented_few_step_request_runs_the_sigmas_its_lora_learned(page: str, folder: str) -> None:
    job = _documented_job(page)
    manifest = json.loads((getattr(pipelines.toy, folder) / "distill-manifest.json").read_text())
    spec, learned = job.sampling_spec(), distill.student_request(256, job.steps).sampling_spec()
    assert (spec.sampler, spec.schedule, job.guidance_scale) == (learned.sampler, learned.schedule, 1.0)
    assert torch.equal(job.sigmas(), torch.tensor(manifest["student_sigmas"]))


# Median gains over 12 pairs in each of eleven sets (`prompt_seed_pairs(12, seed=S)`, S = 31-33 and
# 41-48; docs/toy.md §40, §43-44), smallest and largest set: the 4-step LoRA 3.4-9.6 dB over the
# same work and 1.8-4.4 dB over guidance 1; the 10-step LoRA 0.7-4.5 dB over the same work and
# 2.4-5.4 dB over guidance 1. Each bar is under every set's figure, so the test does not rest on the
# set it runs (31).
FEW_STEP_BARS = [(pipelines.toy.FEW_STEP_DIR, 4, 2.0, 1.0), (pipelines.toy.FEW_STEP_10_DIR, 10, 0.0, 1.0)]


@pytest.mark.slow
@pytest.mark.parametrize(("folder", "steps", "over_same_work", "over_guidance_1"), FEW_STEP_BARS)
def test_a_committed_few_step_lora_is_nearer_its_teacher_than_plain_cfg_at_the_same_work(
    tmp_path: Path, folder: Path, steps: int, over_same_work: float, over_guidance_1: float
) -> None:
    """docs/toy.md §35-44, over 100 pairs at 256 px, PSNR of the pooled error to the defaults' image:
    the 4-step LoRA 20.1 dB, against 15.1 dB for Euler 2 at CFG 5 (the same 4 forwards) and 16.1 dB
    for the base model's own 4 steps at guidance 1; the 10-step LoRA 19.5 dB, against 18.7 dB for
    Euler 5 at CFG 5 and 15.9 dB for the base's own 10 steps (§42-43). Here pair by pair on 12 pairs: one
    pair the teacher draws unlike its prompt moves a pooled figure over a few pairs by dB (§38-39),
    and a median does not."""
    base = _load(tmp_path / "base", [])
    student = _load(tmp_path / "lora", [str(folder)])
    variants = {
        "teacher": (base, distill.teacher_request(256)),
        "lora": (student, distill.student_request(256, steps)),
    } | {name: (base, request) for name, request in distill.baseline_requests(256, steps).items()}
    images: dict[str, list[np.ndarray]] = {name: [] for name in variants}
    for caption, seed in quality.prompt_seed_pairs(12, seed=31):
        for name, (runner, request) in variants.items():
            images[name].append(runner.generate(replace(request, prompt=caption.text, seed=seed)).images[0])
    teacher = images["teacher"]
    gains = {
        name: float(
            np.median(
                [quality.psnr_gain(*p) for p in zip(images["lora"], images[name], teacher, strict=True)]
            )
        )
        for name in ("same work", "guidance 1")
    }
    assert gains["same work"] > over_same_work, gains
    assert gains["guidance 1"] > over_guidance_1, gains


def test_the_set_by_set_benchmark_prints_a_row_per_set_and_refuses_a_lora_without_its_steps() -> None:
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "few_step_sets.py"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, str(script), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)

    lora = f"{pipelines.toy.FEW_STEP_DIR}:4"
    done = run("--sets", "7", "--pairs", "1", "--size", "64", "--lora", lora, "--lora", lora)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # The set's row: for each LoRA the median gain over the same work and over guidance 1, each with
    # its pairs won. The same LoRA twice (its baselines made once) gains the same.
    cell = r"-?\d+\.\d \([01]\) / -?\d+\.\d \([01]\)"
    row = next(line for line in lines if line.startswith("7 | "))
    assert re.fullmatch(rf"7 \| ({cell}) \| \1", row), lines
    assert any(line.startswith("all 1 pairs | ") for line in lines), lines
    assert re.search(r"  7: '.+', seed \d+ \| ", done.stderr), done.stderr  # each pair as it lands
    refused = run("--lora", str(pipelines.toy.FEW_STEP_DIR))
    assert refused.returncode == 2 and "expected DIR:STEPS" in refused.stderr
