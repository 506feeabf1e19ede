"""`pipelines.toy.quality.negative_steering` on a stand-in that renders the toy world exactly: what the
measure counts, skips and pairs, independent of any model (the trained toy's figures are in
test_toy_quality.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from pipelines.request import GenerationRequest, GenerationResult
from pipelines.toy import quality, world


@dataclass
class Renderer:
    """Draws "a circle" etc. in a colour picked by the seed; a negative prompt naming that colour moves
    it to the next colour, unless the seed is in `stubborn`; seeds in `empty` draw no shape."""

    stubborn: set[int] = field(default_factory=set)
    empty: set[int] = field(default_factory=set)
    requests: list[GenerationRequest] = field(default_factory=list)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        self.requests.append(request)
        colours = [c for c in world.COLOURS if c != "blue"]
        colour = colours[request.seed % len(colours)]
        if request.negative_prompt == colour and request.seed not in self.stubborn:
            colour = colours[(request.seed + 1) % len(colours)]
        shape = request.prompt.removeprefix("a ")
        scene = world.Scene(world.Caption(shape, colour, "blue"), 0.5, 0.5, 0.2)
        image = world.render(scene, 64)
        if request.seed in self.empty:
            image = np.broadcast_to(np.array(world.COLOURS["blue"], dtype=np.uint8), image.shape).copy()
        return GenerationResult(images=[image], seed=request.seed)


def test_open_colour_prompts_name_the_kind_alone_and_cycle_through_the_kinds() -> None:
    prompts = quality.open_colour_prompts(6, seed=2)
    assert [p for p, _ in prompts] == ["a circle", "a square", "a triangle"] * 2
    assert [s for _, s in prompts] == list(range(2000, 2006))
    assert all(p in world.partial_texts(world.Caption(p[2:], "red", "blue")) for p, _ in prompts)


def test_the_negative_names_the_colour_read_in_the_unsteered_image_and_counts_what_it_changes() -> None:
    renderer = Renderer(stubborn={1}, empty={3})
    base = GenerationRequest(prompt="", width=64, height=64)
    steering = quality.negative_steering(renderer, quality.open_colour_prompts(5), base)

    # Seed 3 drew no shape, so it has no colour to name and is left out.
    assert steering.read == 4
    assert steering.kept == 1  # seed 1 keeps its colour
    negatives = [r.negative_prompt for r in renderer.requests if r.negative_prompt]
    colours = [c for c in world.COLOURS if c != "blue"]
    assert negatives == [colours[s] for s in (0, 1, 2, 4)]
    # Every other setting of the request is the base's, with the prompt and seed of the pair.
    settings = {(r.width, r.steps, r.guidance_scale) for r in renderer.requests}
    assert settings == {(64, base.steps, base.guidance_scale)}

    change, error, fell = steering.paired()
    assert fell == 3
    assert steering.after[1] == pytest.approx(steering.before[1])  # the stubborn seed
    assert change == pytest.approx(np.mean(np.subtract(steering.after, steering.before)))
    assert change < 0 and error > 0
