"""The toy training script: SD3's objective pieces, the VAE gate, and bit-identical reruns.

Runs are tiny (16 px VAE crops, one 32 px transformer phase of a one-block model, a few steps):
they pin the script's mechanics and reproducibility, not the quality of a trained model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.toy import train, world
from schedulers.sigmas import time_shift

TINY = train.TrainConfig(
    vae_steps=3,
    vae_size=16,
    vae_batch=2,
    depth=1,
    phases=(train.Phase(size=32, steps=3, batch=2, pool=4),),
    warmup=2,
    eval_every=0,
    enforce_gate=False,
)


def _quiet(_: str) -> None:
    pass


def test_sigmas_are_sd3_logit_normal_shifted_as_the_serving_schedule() -> None:
    sigmas = train.sample_sigmas(torch.Generator().manual_seed(0), 20000)
    assert float(sigmas.min()) > 0.0 and float(sigmas.max()) < 1.0
    # The median of logit-normal(0, 1) is t = ½, which shift 3 moves to σ = 0.75.
    assert abs(float(sigmas.median()) - time_shift(0.5, 3.0)) < 0.01
    # A phase's own shift moves the draws up the σ range, the same normal draws through a larger shift.
    shifted = train.sample_sigmas(torch.Generator().manual_seed(0), 20000, 12.0)
    assert abs(float(shifted.median()) - time_shift(0.5, 12.0)) < 0.01
    # Shifts compose by multiplying the odds σ/(1 − σ): shift 12 is shift 3 followed by shift 4.
    assert torch.allclose(shifted, time_shift(sigmas, 4.0), atol=1e-6)


def test_caption_dropout_gives_the_empty_prompt_or_zeros(tmp_path: Path) -> None:
    from pipelines.tiny import build_tiny_pipeline

    bank = train.CaptionBank(build_tiny_pipeline())
    captions = list(world.all_captions()[:3])
    gen = torch.Generator().manual_seed(0)
    kept, _ = train.condition_batch(bank, captions, gen, dataclasses.replace(TINY, drop_empty=0, drop_zero=0))
    assert torch.equal(kept, bank.get([c.text for c in captions])[0])
    empty, pooled = train.condition_batch(bank, captions, gen, dataclasses.replace(TINY, drop_empty=1))
    assert torch.equal(empty, bank.empty_context.expand_as(empty))
    assert torch.equal(pooled, bank.empty_pooled.expand_as(pooled))
    zero, pooled = train.condition_batch(
        bank, captions, gen, dataclasses.replace(TINY, drop_empty=0, drop_zero=1)
    )
    assert not zero.any() and not pooled.any()
    # The context is the serving length: 77 CLIP tokens + 77 T5 tokens (max_sequence_length).
    assert kept.shape[1] == 154


def test_partial_prompts_replace_whole_captions_with_shorter_true_ones() -> None:
    from pipelines.tiny import build_tiny_pipeline

    bank = train.CaptionBank(build_tiny_pipeline())
    captions = list(world.all_captions()[:64])
    always = dataclasses.replace(TINY, drop_empty=0, drop_zero=0, partial=1)
    context, _ = train.condition_batch(bank, captions, torch.Generator().manual_seed(0), always)
    # Every row is the encoding of one of its own caption's partial prompts, and all four forms occur.
    forms = set()
    for row, caption in zip(context, captions, strict=True):
        matches = [
            i
            for i, text in enumerate(world.partial_texts(caption))
            if torch.equal(row, bank.get([text])[0][0])
        ]
        assert len(matches) == 1
        forms.add(matches[0])
    assert forms == {0, 1, 2, 3}
    # Without partial prompts a batch draws only the dropout's numbers, as runs before `partial` did.
    gen = torch.Generator().manual_seed(1)
    train.condition_batch(bank, captions, gen, dataclasses.replace(TINY, partial=0))
    assert torch.equal(torch.rand(1, generator=gen), torch.rand(1, generator=_after(1, len(captions))))


def test_dropping_the_pooled_vector_alone_keeps_the_context_tokens() -> None:
    from pipelines.tiny import build_tiny_pipeline

    bank = train.CaptionBank(build_tiny_pipeline())
    captions = list(world.all_captions()[:64])
    whole_context, whole_pooled = bank.get([c.text for c in captions])
    always = dataclasses.replace(TINY, drop_empty=0, drop_zero=0, drop_pooled=1)
    context, pooled = train.condition_batch(bank, captions, torch.Generator().manual_seed(0), always)
    assert torch.equal(context, whole_context)
    assert torch.equal(pooled, bank.empty_pooled.expand_as(pooled))
    assert not torch.equal(whole_pooled, pooled)  # the captions' own pooled vectors are not the empty one
    # A caption dropped to the empty prompt or to zeros stays so: the pooled drop applies to kept ones.
    zero = dataclasses.replace(TINY, drop_empty=0, drop_zero=1, drop_pooled=1)
    context, pooled = train.condition_batch(bank, captions, torch.Generator().manual_seed(0), zero)
    assert not context.any() and not pooled.any()
    # A share draws per caption: at ½, some of the 64 keep their pooled vector and some lose it.
    half = dataclasses.replace(TINY, drop_empty=0, drop_zero=0, drop_pooled=0.5)
    _, pooled = train.condition_batch(bank, captions, torch.Generator().manual_seed(0), half)
    lost = [torch.equal(row, bank.empty_pooled) for row in pooled]
    assert 16 < sum(lost) < 48
    kept = [torch.equal(row, own) for row, own in zip(pooled, whole_pooled, strict=True)]
    assert [not k for k in kept] == lost
    # Without it a batch draws only the dropout's numbers, as runs before `drop_pooled` did.
    gen = torch.Generator().manual_seed(1)
    train.condition_batch(bank, captions, gen, dataclasses.replace(TINY, drop_pooled=0))
    assert torch.equal(torch.rand(1, generator=gen), torch.rand(1, generator=_after(1, len(captions))))


@pytest.mark.parametrize("flag", ["--partial", "--drop-pooled"])
@pytest.mark.parametrize("bad", ["-0.1", "1.5", "nan", "inf", "a fifth"])
def test_a_share_outside_zero_to_one_is_refused_by_the_command_line(
    flag: str, bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    field = flag.removeprefix("--").replace("-", "_")
    assert getattr(train._arguments(["out", flag, "0.2"])[0], field) == 0.2
    with pytest.raises(SystemExit):
        train._arguments(["out", flag, bad])
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["0", "-0.5", "nan"])
def test_the_text_encoder_recipe_is_chosen_on_the_command_line(
    bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    default = train._arguments(["out"])[0]
    assert (default.words, default.text_residual_scale) == (False, 1.0)  # the tiny model's encoders
    chosen = train._arguments(["out", "--words", "--text-residual-scale", "0.5"])[0]
    assert (chosen.words, chosen.text_residual_scale) == (True, 0.5)
    assert train.config_record(chosen)["words"] is True  # the manifest says which encoders it read
    with pytest.raises(SystemExit):
        train._arguments(["out", "--text-residual-scale", bad])
    assert "--text-residual-scale" in capsys.readouterr().err


def test_the_pool_puts_unpositioned_shapes_where_the_run_says(capsys: pytest.CaptureFixture[str]) -> None:
    vae = train.build_vae(TINY)
    centres = torch.tensor([[v * 24 - 0.5 for v in c] for c in world.POSITIONS.values()])  # latent px

    def offsets(unpositioned: str) -> torch.Tensor:
        """How far each unpositioned circle's or square's mask centroid (a triangle's is off its
        centre) lies from the nearest cell's centre, in latent pixels."""
        pool = train.LatentPool(vae, np.random.default_rng(0), size=192, count=96, unpositioned=unpositioned)
        found = []
        for caption, mask in zip(pool.captions, pool.masks, strict=True):
            if caption.position is None and caption.shape != "triangle":
                ys, xs = torch.nonzero(mask[0], as_tuple=True)
                centroid = torch.stack([xs.float().mean(), ys.float().mean()])
                found.append((centres - centroid).norm(dim=1).min())
        assert len(found) >= 4
        return torch.stack(found)

    # A mask is whole latent pixels, so a centred shape's centroid may sit half a pixel off per axis.
    cells, anywhere = offsets("cells"), offsets("anywhere")
    assert cells.max() <= 0.75 and anywhere.mean() > 2.0
    assert train._arguments(["out"])[0].unpositioned == "anywhere"
    assert train._arguments(["out", "--unpositioned", "cells"])[0].unpositioned == "cells"
    with pytest.raises(SystemExit):
        train._arguments(["out", "--unpositioned", "nowhere"])
    assert "--unpositioned" in capsys.readouterr().err

    # A larger unpositioned shape reaches the pool, and so the loss's shape masks.
    def areas(scale: float) -> list[float]:
        pool = train.LatentPool(vae, np.random.default_rng(0), size=96, count=48, unpositioned_scale=scale)
        pairs = zip(pool.captions, pool.masks, strict=True)
        return [float(m[0].sum()) for c, m in pairs if c.position is None]

    assert all(big > 1.8 * small for small, big in zip(areas(1.0), areas(2.0), strict=True))
    assert train._arguments(["out", "--unpositioned-scale", "2"])[0].unpositioned_scale == 2.0
    with pytest.raises(SystemExit):
        train._arguments(["out", "--unpositioned-scale", "5"])
    assert "--unpositioned-scale" in capsys.readouterr().err


def _after(seed: int, draws: int) -> torch.Generator:
    gen = torch.Generator().manual_seed(seed)
    torch.rand(draws, generator=gen)
    return gen


def test_a_vae_that_misses_its_gate_stops_the_script_before_the_transformer(tmp_path: Path) -> None:
    config = dataclasses.replace(TINY, vae_steps=1, enforce_gate=True)
    with pytest.raises(train.GateFailed, match="PSNR"):
        train.train(config, tmp_path / "toy", log=_quiet)
    assert not (tmp_path / "toy").exists()


def test_two_identical_short_runs_write_bit_identical_weights(tmp_path: Path) -> None:
    first = train.train(TINY, tmp_path / "a", log=_quiet)
    second = train.train(TINY, tmp_path / "b", log=_quiet)
    assert first["files"] == second["files"]
    weights = [name for name in first["files"] if name.endswith(".safetensors")]
    assert {name.split("/")[0] for name in weights} >= {"transformer", "vae", "text_encoder_3"}


def test_the_command_writes_a_diffusers_folder_with_a_manifest(tmp_path: Path) -> None:
    out = tmp_path / "toy"
    status = train.main(
        [str(out), "--vae-steps", "2", "--vae-size", "16", "--vae-batch", "2", "--depth", "2"]
        + ["--phase", "32:2:2", "--phase", "+48:1:1:3@6", "--no-gate", "--eval-every", "0"]
        + ["--unpositioned-scale", "1.5"]
    )
    assert status == 0
    manifest = json.loads((out / train.MANIFEST).read_text())
    assert manifest["script_version"] == train.SCRIPT_VERSION
    # The world it was trained on is read back from the manifest (1 for a folder without one).
    assert train.trained_unpositioned_scale(out) == 1.5 and train.trained_unpositioned_scale(tmp_path) == 1.0
    assert manifest["config"]["phases"] == [
        # The pool defaults to a quarter of the draws; "+" runs 48 px interleaved with 32 px.
        {"size": 32, "steps": 2, "batch": 2, "pool": 2, "interleave": False, "shift": 3.0},
        {"size": 48, "steps": 1, "batch": 1, "pool": 3, "interleave": True, "shift": 6.0},
    ]
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    # SD3's width rule, which ComfyUI's detection reads the depth from: hidden 64·depth, heads of 64.
    transformer = json.loads((out / "transformer" / "config.json").read_text())
    assert transformer["num_layers"] == 2 == transformer["num_attention_heads"]
    assert transformer["attention_head_dim"] == 64 and transformer["caption_projection_dim"] == 128
    assert (transformer["patch_size"], transformer["in_channels"], transformer["out_channels"]) == (2, 16, 16)
    vae = json.loads((out / "vae" / "config.json").read_text())
    assert vae["latent_channels"] == 16 and len(vae["block_out_channels"]) == 4  # 8x
    assert (vae["scaling_factor"], vae["shift_factor"]) == (1.5305, 0.0609)


def test_vae_only_reports_the_gate_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "toy"
    status = train.main([str(out), "--vae-only", "--vae-steps", "1", "--vae-size", "16", "--vae-batch", "2"])
    assert status == 2  # one step cannot pass the gate
    assert json.loads(capsys.readouterr().out)["vae_gate"]["passed"] is False
    assert not out.exists()


def test_progress_reports_judge_the_ema_weights_through_the_serving_generator(tmp_path: Path) -> None:
    config = dataclasses.replace(TINY, eval_every=2, eval_prompts=2)
    manifest = train.train(config, tmp_path / "toy", log=_quiet)
    # One report after step 2 and one at the phase's end (step 3), each over the two fixed captions.
    assert [(p["step"], p["size"]) for p in manifest["progress"]] == [(2, 32), (3, 32)]
    for report in manifest["progress"]:
        assert set(report) >= {"background", "colour", "shape"}
        assert all(0.0 <= report[k] <= 1.0 for k in ("background", "colour", "shape"))


def test_a_cached_vae_is_reused_bit_for_bit(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = train.train(TINY, tmp_path / "a", log=_quiet, vae_cache=cache)
    assert len(list(cache.glob("vae-*.safetensors"))) == 1
    lines: list[str] = []
    second = train.train(TINY, tmp_path / "b", log=lines.append, vae_cache=cache)
    assert any(line.startswith("vae: loaded from") for line in lines)
    assert first["files"] == second["files"]


def test_a_phase_is_size_steps_batch_and_an_optional_pool() -> None:
    assert train.Phase.parse("128:100:16") == train.Phase(size=128, steps=100, batch=16, pool=400)
    assert train.Phase.parse("128:100:16:50").pool == 50
    with pytest.raises(ValueError, match="multiple of 16"):
        train.Phase.parse("100:1:1")
    with pytest.raises(ValueError, match="SIZE:STEPS:BATCH"):
        train.Phase.parse("128:1")
    assert train.Phase.parse("+512:10:4").interleave and not train.Phase.parse("512:10:4").interleave
    assert train.Phase.parse("512:10:4").shift == train.FLOW_SHIFT
    assert train.Phase.parse("+512:10:4:64@6").shift == 6.0 and train.Phase.parse("512:10:4@12.5").pool == 10
    for bad in ("512:10:4@", "512:10:4@x", "512:10:4@0", "512:10:4@-2", "512:10:4@nan", "512:10:4@inf"):
        with pytest.raises(ValueError):
            train.Phase.parse(bad)


def test_interleaved_phases_spread_their_steps_evenly_over_each_other(
    capsys: pytest.CaptureFixture[str],
) -> None:
    a, b, c = (train.Phase.parse(text) for text in ("128:4:8", "256:6:4", "+512:3:2"))
    assert train.stages([a, b, c]) == [[a], [b, c]]
    order = train.interleaving([b, c])
    assert order == [0, 1, 0, 0, 1, 0, 0, 1, 0]  # 6 and 3 steps: every third step is 512 px
    assert order.count(0) == b.steps and order.count(1) == c.steps
    with pytest.raises(ValueError, match="nothing before it"):
        train.stages([c, a])
    with pytest.raises(SystemExit):
        train.main(["out", "--phase", "+128:1:1"])
    assert "--phase: the first phase has nothing before it" in capsys.readouterr().err


def test_an_interleaved_run_trains_each_size_and_times_them_together(tmp_path: Path) -> None:
    phases = (train.Phase(size=32, steps=2, batch=2, pool=4), train.Phase.parse("+48:1:1:2"))
    result = train.train(dataclasses.replace(TINY, phases=phases), tmp_path / "toy", log=_quiet)
    timings = result["timings"]
    assert {"pool_32px_wall_seconds_per_step", "pool_48px_wall_seconds_per_step"} <= timings.keys()
    assert "transformer_32+48px_wall_seconds_per_step" in timings
    assert "transformer_32px_wall_seconds_per_step" not in timings


@pytest.mark.slow
def test_bf16_autocast_is_a_recorded_switch_and_still_reproducible(tmp_path: Path) -> None:
    config = dataclasses.replace(TINY, autocast_bf16=True)
    first = train.train(config, tmp_path / "a", log=_quiet)
    second = train.train(config, tmp_path / "b", log=_quiet)
    assert first["files"] == second["files"]
    assert first["config"]["autocast_bf16"] is True
    plain = train.train(TINY, tmp_path / "c", log=_quiet)
    assert (
        plain["files"]["transformer/diffusion_pytorch_model.safetensors"]
        != (first["files"]["transformer/diffusion_pytorch_model.safetensors"])
    )
    assert train._arguments(["out", "--bf16"])[0].autocast_bf16 is True


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_that_emulates_it_runs_with_a_warning(
    native: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipelines import loading

    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: native)
    argv = ["out", "--bf16", "--vae-only", "--vae-steps", "1", "--vae-size", "16", "--vae-batch", "1"]
    assert train.main(argv) in (0, 2)  # one VAE step rarely passes the gate; either way it ran
    assert ("warning: --bf16 on a CPU without native bf16" in capsys.readouterr().err) is not native


def test_the_shape_mask_covers_the_shape_and_one_latent_pixel_around_it() -> None:
    scene = world.Scene(world.parse_caption("a red square on a blue background"), 0.5, 0.5, 0.1)
    mask = train.shape_masks([scene], size=256)[0, 0]  # 32 × 32 latent pixels; the square 6.4 across
    assert mask.shape == (32, 32)
    assert mask[16, 16] == 1 and mask[0, 0] == 0
    inside = world.signed_distance(scene, 32, 32) < 0
    assert bool(mask[torch.from_numpy(inside)].all())  # all of the shape ...
    assert int(mask.sum()) > int(inside.sum())  # ... and a border
    assert int(mask.sum()) < 0.1 * 32 * 32


def test_the_shape_weight_leaves_plain_mse_at_zero_and_scales_the_shape_up() -> None:
    gen = torch.Generator().manual_seed(0)
    v, target = torch.randn(2, 16, 8, 8, generator=gen), torch.randn(2, 16, 8, 8, generator=gen)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:4, 2:4] = 1.0
    assert torch.equal(train.flow_loss(v, target, mask, 0.0), torch.nn.functional.mse_loss(v, target))
    error_in_shape = torch.zeros_like(v)
    error_in_shape[:, :, 2:4, 2:4] = 1.0
    plain, weighted = (train.flow_loss(error_in_shape, torch.zeros_like(v), mask, w) for w in (0.0, 9.0))
    assert float(weighted) > 5 * float(plain)  # the shape's error counts for more


def test_the_edge_mask_is_a_ring_round_the_outline_and_its_weight_counts_there() -> None:
    scene = world.Scene(world.parse_caption("a red square on a blue background"), 0.5, 0.5, 0.2)
    masks = train.shape_masks([scene], size=256)  # the square 12.8 latent pixels across
    ring = masks[0, 1]
    distance = torch.from_numpy(world.signed_distance(scene, 32, 32))
    assert ring[16, 16] == 0 and ring[0, 0] == 0  # neither the shape's middle nor the far background
    assert bool(ring[distance.abs() < 0.5].all()) and not bool(ring[distance.abs() > 1.0].any())
    error_on_ring = torch.zeros(1, 16, 32, 32)
    error_on_ring[:, :, ring.bool()] = 1.0
    zero = torch.zeros_like(error_on_ring)
    plain, edged = (train.flow_loss(error_on_ring, zero, masks, 0.0, w) for w in (0.0, 4.0))
    assert float(plain) == float(torch.nn.functional.mse_loss(error_on_ring, zero))
    assert float(edged) > 2 * float(plain)


def test_a_run_can_start_from_an_earlier_toy_folder(tmp_path: Path) -> None:
    first = train.train(TINY, tmp_path / "a", log=_quiet)
    again = dataclasses.replace(TINY, init=str(tmp_path / "a"), shape_weight=9.0)
    second = train.train(again, tmp_path / "b", log=_quiet)
    assert second["config"]["init"] == str(tmp_path / "a") and second["config"]["shape_weight"] == 9.0
    # The parent's settings and checksums travel with the child, not only the path it lay at.
    written = json.loads((tmp_path / "a" / train.MANIFEST).read_text())
    assert second["parent"]["config"] == written["config"] and second["parent"]["files"] == first["files"]
    assert "parent" not in first and "progress" not in second["parent"]
    assert (
        second["files"]["vae/diffusion_pytorch_model.safetensors"]
        == first["files"]["vae/diffusion_pytorch_model.safetensors"]
    )  # the VAE comes along untouched; the transformer trains on
    assert (
        second["files"]["transformer/diffusion_pytorch_model.safetensors"]
        != first["files"]["transformer/diffusion_pytorch_model.safetensors"]
    )
    for part in ("vae", "transformer"):  # nothing of where the earlier folder lay
        assert "_name_or_path" not in json.loads((tmp_path / "b" / part / "config.json").read_text())
    with pytest.raises(ValueError, match="--depth 1"):
        train.train(dataclasses.replace(again, depth=2), tmp_path / "c", log=_quiet)


def test_a_fine_tune_onto_other_text_encoders_says_so(tmp_path: Path) -> None:
    train.train(TINY, tmp_path / "a", log=_quiet)
    for cfg, warned in (
        (TINY, False),
        (dataclasses.replace(TINY, words=True), True),
        (dataclasses.replace(TINY, text_residual_scale=0.5), True),
    ):
        lines: list[str] = []
        train.train(dataclasses.replace(cfg, init=str(tmp_path / "a")), tmp_path / "b", log=lines.append)
        assert any("other text encoders" in line for line in lines) is warned, cfg
