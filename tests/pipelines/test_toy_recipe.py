"""The recipe behind the committed toy (`python -m pipelines.toy.recipe`) against what the committed
folder records about its own training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import pipelines.toy
from pipelines.toy import recipe, train

needs_weights = pytest.mark.skipif(
    not (pipelines.toy.MODEL_DIR / train.MANIFEST).exists(),
    reason="the toy's weights are not in this checkout",
)


@needs_weights
def test_every_recorded_run_of_the_committed_chain_is_the_recipes_command() -> None:
    # The committed manifest nests its parents back to run 19; run 17, the run from nothing, is
    # recorded only in docs/toy.md §19.
    chain = recipe.recorded_chain()
    assert len(chain) == len(recipe.STAGES) - 1
    for index, recorded in enumerate(chain, start=1):
        stage = recipe.STAGES[index]
        assert recipe.differences(recorded, recipe.argv(index, Path("out"))) == {}, stage.name


@needs_weights
def test_a_changed_setting_is_a_difference_and_a_later_default_is_not() -> None:
    last = len(recipe.STAGES) - 1
    recorded = recipe.recorded_chain()[-1]
    arguments = recipe.argv(last, Path("out"))
    assert recipe.differences({**recorded, "seed": recorded["seed"] + 1}, arguments) == {
        "seed": (recorded["seed"] + 1, recorded["seed"])
    }
    # Run 19 was recorded before `--edge-weight` existed; left at its default it trains as before.
    first_fine_tune = recipe.recorded_chain()[0]
    assert "edge_weight" not in first_fine_tune
    assert recipe.differences(first_fine_tune, recipe.argv(1, Path("out"))) == {}
    assert recipe.differences(first_fine_tune, [*recipe.argv(1, Path("out")), "--edge-weight", "2"]) == {
        "edge_weight": (None, 2.0)
    }


def test_each_stage_starts_from_the_one_before_and_only_the_first_trains_the_vae(tmp_path: Path) -> None:
    for index, stage in enumerate(recipe.STAGES):
        arguments = recipe.argv(index, tmp_path)
        assert arguments[0] == str(tmp_path / stage.name)
        if index == 0:
            assert "--init" not in arguments
            assert arguments[arguments.index("--vae-cache") + 1] == str(tmp_path / "vae-cache")
        else:
            assert arguments[arguments.index("--init") + 1] == str(tmp_path / recipe.STAGES[index - 1].name)
        recipe.settings(arguments)  # every command parses


def test_a_stage_is_finished_only_when_its_folder_holds_a_complete_run_of_its_settings(
    tmp_path: Path,
) -> None:
    index = 2
    before, folder = (tmp_path / recipe.STAGES[i].name for i in (index - 1, index))
    assert not recipe.finished(index, tmp_path)
    before.mkdir()
    folder.mkdir()
    (before / train.MANIFEST).write_text(json.dumps({"files": {"weights": "1"}}))
    own = recipe.settings(recipe.argv(index, tmp_path))
    parent = {"files": {"weights": "1"}}
    # A manifest without file checksums is a run that did not get to the end.
    (folder / train.MANIFEST).write_text(json.dumps({"config": own, "parent": parent}))
    assert not recipe.finished(index, tmp_path)
    (folder / train.MANIFEST).write_text(json.dumps({"config": own, "parent": parent, "files": {}}))
    assert recipe.finished(index, tmp_path)
    (folder / train.MANIFEST).write_text(
        json.dumps({"config": {**own, "lr": 1.0}, "parent": parent, "files": {}})
    )
    assert not recipe.finished(index, tmp_path)
    # Started from other files than the stage before now holds (it was rerun since): stale.
    (before / train.MANIFEST).write_text(json.dumps({"files": {"weights": "2"}}))
    (folder / train.MANIFEST).write_text(json.dumps({"config": own, "parent": parent, "files": {}}))
    assert not recipe.finished(index, tmp_path)


def test_print_lists_the_seven_commands_and_runs_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert recipe.main([str(tmp_path), "--print"]) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert len(commands) == len(recipe.STAGES)
    assert all("-m pipelines.toy.train" in line for line in commands)
    assert list(tmp_path.iterdir()) == []


def test_the_chain_runs_each_stage_from_the_one_before_and_a_rerun_skips_finished_stages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Two stages at a size that trains in seconds, through the real subprocess calls.
    vae = ("--vae-steps", "2", "--vae-size", "16", "--vae-batch", "2")
    tiny = (*vae, "--depth", "2", "--no-gate", "--eval-every", "0", "--threads", "1")
    stages = (
        recipe.Stage("first", "§0", 1, (*tiny, "--phase", "32:2:2")),
        recipe.Stage("second", "§0", 1, (*tiny, "--seed", "3", "--phase", "32:1:2")),
    )
    monkeypatch.setattr(recipe, "STAGES", stages)
    assert recipe.main([str(tmp_path)]) == 0
    first = json.loads((tmp_path / "first" / train.MANIFEST).read_text())
    second = json.loads((tmp_path / "second" / train.MANIFEST).read_text())
    assert second["config"]["init"] == str(tmp_path / "first") and second["config"]["seed"] == 3
    assert second["parent"]["files"] == first["files"]
    out = capsys.readouterr().out
    assert "differs from the committed folder" in out and "already done" not in out
    made = (tmp_path / "second" / train.MANIFEST).stat().st_mtime_ns
    assert recipe.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("already done, skipped") == 2
    assert (tmp_path / "second" / train.MANIFEST).stat().st_mtime_ns == made
