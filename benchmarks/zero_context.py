"""What the zeroed-out negative would save, measured instead of built: one transformer forward on
ConditioningZeroOut's all-zero context, as the loop runs it and with the context collapsed to one
token that stands for all of them.

    python benchmarks/zero_context.py                           # SD3 Medium's width, 2 blocks, 512²
    python benchmarks/zero_context.py --size 1024 --depth 1
    python benchmarks/zero_context.py --model toy

Under the API's default negative window (docs/sampling.md §5) the second row of ~90 % of the steps is
the zeroed-out negative: a context of zeros, a pooled vector of zeros. The context embedder then gives
every context token the same vector, and since SD3 gives context tokens no position, they stay equal
through every block (each is modulated, projected and attended to alike). So the image tokens
attend to L equal keys with L equal values, which is one key whose softmax weight is L times as
large: one context token plus ln(L) added to its attention logit. That is the same function, up to
float rounding; the forward then carries 1 context token instead of L (154 for a prompt of up to
75 tokens, as this server encodes it; `--context` sets it).

The script builds the transformer (`--model toy`: the trained toy's; otherwise a random-weight one
of SD3 Medium's width and `--depth` blocks), runs the zero-out forward both ways at `--size`, and
prints how far apart they are and their times, alternating, in one process. Not in the server: at
the API's 1024² and 154 context tokens the masked attention costs more than it saves (benchmarks/
README.md); its processor below handles SD3 Medium's attention only (no fused QKV, no qk-norm).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.toy import MODEL_DIR  # noqa: E402

# 77 CLIP tokens beside 77 T5 ones: a prompt of up to 75 tokens, as ComfyUI and this server
# encode it (docs/performance.md §2); diffusers' default T5 length makes it 333.
CONTEXT_TOKENS = 154


class CollapsedContextAttention:
    """SD3's joint attention with the context stream standing for `context_count` equal tokens."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        context_count: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, tokens = hidden_states.shape[:2]

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

        image = [split_heads(p(hidden_states)) for p in (attn.to_q, attn.to_k, attn.to_v)]
        context = [
            split_heads(p(encoder_hidden_states)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        ]
        q, k, v = (torch.cat([i, c], dim=2) for i, c in zip(image, context, strict=True))
        bias = torch.zeros(1, k.shape[2], dtype=q.dtype, device=q.device)
        bias[:, tokens:] = math.log(context_count)  # each context key counts `context_count` times
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(batch, -1, q.shape[1] * q.shape[3])
        image_out, context_out = out[:, :tokens], out[:, tokens:]
        if not attn.context_pre_only:
            context_out = attn.to_add_out(context_out)
        return attn.to_out[1](attn.to_out[0](image_out)), context_out


def build(model: str, depth: int, width: int) -> Any:
    from diffusers import SD3Transformer2DModel

    if model == "toy":
        return SD3Transformer2DModel.from_pretrained(str(MODEL_DIR / "transformer")).eval()
    torch.manual_seed(0)
    random: Any = SD3Transformer2DModel(
        num_layers=depth,
        attention_head_dim=64,
        num_attention_heads=width // 64,
        joint_attention_dim=4096,
        caption_projection_dim=width,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=192,
    )
    return random.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["random", "toy"], default="random")
    parser.add_argument("--depth", type=int, default=2, help="random: transformer blocks")
    parser.add_argument("--width", type=int, default=1536, help="random: hidden width (SD3 Medium's 1536)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--context", type=int, default=CONTEXT_TOKENS, help="context tokens as run")
    args = parser.parse_args()
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    transformer = build(args.model, args.depth, args.width)
    config = transformer.config
    x = torch.randn(1, 16, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(1))
    common = {
        "hidden_states": x,
        "timestep": torch.tensor([700.0]),
        "pooled_projections": torch.zeros(1, config.pooled_projection_dim),
    }
    zeros = torch.zeros(1, args.context, config.joint_attention_dim)

    def as_run() -> torch.Tensor:
        transformer.set_attn_processor(JointAttnProcessor2_0())
        return transformer(**common, encoder_hidden_states=zeros, return_dict=False)[0]

    def collapsed() -> torch.Tensor:
        transformer.set_attn_processor(CollapsedContextAttention())
        kwargs = {"context_count": args.context}
        return transformer(
            **common, encoder_hidden_states=zeros[:, :1], joint_attention_kwargs=kwargs, return_dict=False
        )[0]

    with torch.inference_mode():
        reference, short = as_run(), collapsed()
        scale = float(reference.abs().max())
        print(
            f"{args.model} transformer, {args.size}², {args.context} zero context tokens against 1: "
            f"largest difference {float((short - reference).abs().max()) / scale:.2e} of the output's "
            f"largest value",
            flush=True,
        )
        times: dict[str, list[float]] = {"as run": [], "collapsed": []}
        for round_ in range(args.rounds):
            order = [("as run", as_run), ("collapsed", collapsed)]
            for label, forward in order if round_ % 2 == 0 else order[::-1]:
                started = time.perf_counter()
                forward()
                times[label].append(time.perf_counter() - started)
    full, short_s = statistics.median(times["as run"]), statistics.median(times["collapsed"])
    # The other row of the CFG pair (the prompt's) is unchanged: a step's two forwards gain less.
    print(
        f"zero-out forward: as run {full:.3f} s, collapsed {short_s:.3f} s ({full / short_s:.2f}x); "
        f"a guided step of two rows: {2 * full / (full + short_s):.2f}x"
    )


if __name__ == "__main__":
    main()
