"""A grid of the toy's images: one row per caption, one column per seed, at the API's defaults,
generated through the serving code, with what the judge reads under each image.

    python benchmarks/toy_grid.py docs/toy-run4.jpg --size 256
    python benchmarks/toy_grid.py /tmp/toy-1024.jpg --size 1024 --seeds 1

This is how README's and docs/toy.md's pictures of the toy are made.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.request import GenerationRequest  # noqa: E402
from pipelines.toy import judge, world  # noqa: E402

CAPTIONS = (
    "a red circle on a blue background",
    "a yellow square on a black background at the top left",
    "a green triangle on a white background",
    "a purple circle on an orange background at the bottom right",
)
LABEL_HEIGHT = 14


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the JPEG to write")
    parser.add_argument("--model", default="toy")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--caption", action="append", help="instead of the four default captions")
    args = parser.parse_args()

    from server.config import Settings
    from server.runtime import load_runtime

    settings = Settings(
        data_dir=Path(tempfile.mkdtemp(prefix="sd3-grid-")),
        model={"id": args.model, "device": "cpu", "dtype": args.dtype},
    )
    generator = load_runtime(settings).generator
    captions = args.caption or list(CAPTIONS)
    base = GenerationRequest(prompt="", width=args.size, height=args.size)
    cell = args.size + LABEL_HEIGHT
    sheet = Image.new("RGB", (args.size * args.seeds, cell * len(captions)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, text in enumerate(captions):
        caption = world.parse_caption(text)
        for seed in range(args.seeds):
            image = generator.generate(replace(base, prompt=text, seed=seed)).images[0]  # type: ignore[attr-defined]
            reading = judge.read(np.asarray(image))
            right = reading.agrees_with(caption)
            sheet.paste(Image.fromarray(image), (seed * args.size, row * cell))
            where = f" {reading.position}" if caption.position else ""
            score = f"{sum(right.values())}/{len(right)}"
            label = f"{reading.colour} {reading.shape} on {reading.background}{where} ({score})"
            draw.text((seed * args.size + 2, row * cell + args.size + 1), label, fill="black")
            print(f"{text!r} seed {seed}: read as {label}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, quality=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
