"""The toy world: a finite caption set, and scale-free, deterministic renders of its scenes."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.toy import world


def test_caption_set_is_finite_unique_and_parses_back() -> None:
    captions = world.all_captions()
    # 3 shapes × 8 colours × 7 other background colours × (no position + 9 positions).
    assert len(captions) == 3 * 8 * 7 * 10
    texts = [c.text for c in captions]
    assert len(set(texts)) == len(texts)
    assert all(world.parse_caption(c.text) == c for c in captions)
    assert world.Caption("circle", "red", "blue", "top left").text == (
        "a red circle on a blue background at the top left"
    )
    assert world.Caption("square", "orange", "white").text == "an orange square on a white background"
    with pytest.raises(ValueError):
        world.parse_caption("a red circle on a red background")


def test_partial_prompts_are_shorter_and_say_only_what_is_true() -> None:
    caption = world.Caption("triangle", "orange", "blue", "top")
    assert world.partial_texts(caption) == ("orange", "an orange triangle", "a triangle", "a blue background")
    # Never a whole caption (those are the full set's), and few distinct ones over the whole world.
    partial = {text for c in world.all_captions() for text in world.partial_texts(c)}
    assert not partial & {c.text for c in world.all_captions()}
    assert len(partial) == 8 + 8 * 3 + 3 + 8


def test_a_seed_fixes_the_scene_and_the_pixels() -> None:
    first = [world.random_scene(np.random.default_rng(7)) for _ in range(2)]
    assert first[0] == first[1]
    assert np.array_equal(world.render(first[0], 96), world.render(first[1], 96))


def test_the_share_of_unpositioned_scenes_can_be_set_and_is_a_tenth_otherwise() -> None:
    def share(unpositioned_share: float | None = None) -> float:
        rng = np.random.default_rng(3)
        scenes = [world.random_scene(rng, unpositioned_share=unpositioned_share) for _ in range(2000)]
        return float(np.mean([scene.caption.position is None for scene in scenes]))

    assert 0.08 < share() < 0.12
    assert 0.47 < share(0.5) < 0.53
    assert share(1.0) == 1.0 and share(0.0) == 0.0
    with pytest.raises(ValueError, match="unpositioned_share"):
        world.random_scene(np.random.default_rng(0), unpositioned_share=1.5)


def test_an_unpositioned_shape_can_be_drawn_larger_and_still_fits_the_image() -> None:
    def scenes(scale: float) -> list[world.Scene]:
        rng = np.random.default_rng(11)
        return [world.random_scene(rng, unpositioned_share=0.5, unpositioned_scale=scale) for _ in range(400)]

    plain, large = scenes(1.0), scenes(2.0)
    # The same captions in the same order (the scale draws nothing), positioned layouts untouched ...
    assert [s.caption for s in plain] == [s.caption for s in large]
    assert [s for s in plain if s.caption.position] == [s for s in large if s.caption.position]
    # ... and each unpositioned shape twice the half-size, still clear of every edge.
    unpositioned = [(p, s) for p, s in zip(plain, large, strict=True) if s.caption.position is None]
    assert unpositioned
    for p, s in unpositioned:
        assert s.half_size == pytest.approx(2.0 * p.half_size)
        covered = world.coverage(world.signed_distance(s, 96, 96)) > 0
        assert not (covered[0].any() or covered[-1].any() or covered[:, 0].any() or covered[:, -1].any())
    for bad in (0.2, 4.0):
        with pytest.raises(ValueError, match="unpositioned_scale"):
            world.random_scene(np.random.default_rng(0), unpositioned_scale=bad)
    with pytest.raises(ValueError, match="anywhere"):
        world.random_scene(np.random.default_rng(0), unpositioned="cells", unpositioned_scale=2.0)


def test_renders_are_flat_colours_blended_only_along_the_edge() -> None:
    scene = world.scene_for(world.Caption("triangle", "yellow", "purple", "center"), np.random.default_rng(0))
    image = world.render(scene, 128).reshape(-1, 3).astype(int)
    fg, bg = np.array(world.COLOURS["yellow"]), np.array(world.COLOURS["purple"])
    pure = (image == fg).all(axis=1) | (image == bg).all(axis=1)
    assert pure.mean() > 0.97  # only the one-pixel anti-aliased rim is a blend
    assert 0.02 < (image == fg).all(axis=1).mean() < 0.1


def test_the_world_is_scale_free() -> None:
    # The same scene at 64 px and at 256 px (box-filtered down to 64) differs only along the rim.
    scene = world.scene_for(world.Caption("circle", "red", "green", "top right"), np.random.default_rng(3))
    small = world.render(scene, 64).astype(float)
    large = world.render(scene, 256).astype(float).reshape(64, 4, 64, 4, 3).mean(axis=(1, 3))
    assert np.abs(small - large).mean() < 1.5


@pytest.mark.parametrize("position", list(world.POSITIONS))
def test_a_positioned_shape_stays_inside_its_third_of_the_image(position: str) -> None:
    rng = np.random.default_rng(11)
    col, row = (int(3 * v) for v in world.POSITIONS[position])
    for _ in range(20):
        scene = world.scene_for(world.Caption("square", "black", "white", position), rng)
        assert (int(3 * scene.x), int(3 * scene.y)) == (col, row)
        image = world.render(scene, 60, 90)  # not square: positions are fractions of each side
        ys, xs = np.nonzero((image != world.COLOURS["white"]).any(axis=-1))
        assert ys.min() > 0 and xs.min() > 0 and ys.max() < 89 and xs.max() < 59  # never touches the edge


def test_the_cells_variant_puts_an_unpositioned_shape_in_one_of_the_nine_cells() -> None:
    caption = world.Caption("circle", "red", "green")
    rng = np.random.default_rng(5)
    cells = set()
    for _ in range(200):
        scene = world.scene_for(caption, rng, unpositioned="cells")
        nearest = min(world.POSITIONS.values(), key=lambda c: abs(c[0] - scene.x) + abs(c[1] - scene.y))
        assert abs(scene.x - nearest[0]) <= world.JITTER and abs(scene.y - nearest[1]) <= world.JITTER
        cells.add(nearest)
    assert len(cells) == 9
    # A positioned caption is drawn as before, and the default world still puts the shape anywhere.
    positioned = world.Caption("circle", "red", "green", "top")
    assert world.scene_for(positioned, np.random.default_rng(1), unpositioned="cells") == world.scene_for(
        positioned, np.random.default_rng(1)
    )
    anywhere = [world.scene_for(caption, rng) for _ in range(50)]
    assert len({(round(3 * s.x, 1), round(3 * s.y, 1)) for s in anywhere}) > 20
    with pytest.raises(ValueError, match="unpositioned"):
        world.scene_for(caption, rng, unpositioned="nowhere")


def test_the_vocabulary_is_every_word_a_caption_or_partial_prompt_uses() -> None:
    words = world.vocabulary()
    assert list(words) == sorted(set(words))
    # Articles and prepositions of the captions ("an orange ...", "in the center") and the position words.
    grammar = {"a", "an", "at", "in", "on", "the", "background", "top", "bottom", "left", "right", "center"}
    assert set(words) == {*world.COLOURS, *world.SHAPES, *grammar}
