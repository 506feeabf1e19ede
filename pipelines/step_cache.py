"""An opt-in step cache: skip the transformer's later blocks on evaluations where its input barely moved.

The First-Block Cache idea (ParaAttention's FBCache; cache-dit's DBCache with one front block and no
back blocks): between nearby sigmas, how far the first block's residual moves predicts how far the
whole model's output moves. So every forward runs the embeddings and the first block; when that
residual has moved less than `threshold` (relative L1) since the last forward that ran everything, the
remaining blocks are not run and their residual from that forward is added instead. The result is an
approximation: how far it strays is measured on the trained toy (`benchmarks/quality.py --cache`).

Why not cache-dit's hooks: it counts transformer calls as steps and tells the CFG branches apart by call
order, while our loop stacks the conditionings of one evaluation into one forward whose rows change
mid-sampling (the negative window hands over from the negative prompt to the zeroed-out one), and
multi-stage samplers call the model two or three times per step. Here the state is kept per set of
conditionings (the forward's `key`), so a forward only ever reuses work of a forward over the same rows.

The state is one generation's: `StepCache` is created per sampling run and dropped with it, so
concurrent or successive jobs never share cached tensors.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from pipelines.options import StepCacheLevel


@dataclass(frozen=True, kw_only=True)
class StepCachePolicy:
    # Reuse when mean|r − r_ref| / mean|r_ref| of the first block's residual is below this.
    threshold: float
    # Forwards of a key that always run whole before any reuse: the first evaluations, at high
    # sigma, move the most and set the composition.
    warmup: int = 2
    # Reuses in a row before a forward must run whole again: bounds the drift of a stale residual.
    max_consecutive: int = 3


# The named levels of the API's `cache` field. Thresholds in the range FBCache and cache-dit use for
# a one-block probe; what each costs in image quality is benchmarks/quality.py's to measure, and how
# often each can fire on a model, benchmarks/step_cache_moves.py's (on the 4-block toy at 25 steps,
# `fast` never does: its first block moves ≥ 6 % a step).
LEVELS: dict[StepCacheLevel, StepCachePolicy | None] = {
    "off": None,
    "fast": StepCachePolicy(threshold=0.05),
    "faster": StepCachePolicy(threshold=0.12, max_consecutive=5),
}


def policy_for(level: str) -> StepCachePolicy | None:
    for name, policy in LEVELS.items():
        if name == level:
            return policy
    raise ValueError(f"unknown step cache level {level!r}; one of {', '.join(LEVELS)}")


@dataclass
class _Entry:
    first_residual: torch.Tensor  # the first block's image residual at the last whole forward
    tail_residual: torch.Tensor  # what the remaining blocks added to the image stream then
    whole: int = 1  # whole forwards so far
    in_a_row: int = 0  # reuses since the last whole forward


@dataclass
class StepCache:
    """One sampling run's cache; `forward` stands in for `transformer(...)[0]`."""

    policy: StepCachePolicy
    computed: int = 0  # forwards that ran every block
    reused: int = 0  # forwards that ran the first block only
    _entries: dict[Hashable, _Entry] = field(default_factory=dict)

    def forward(
        self,
        transformer: Any,
        key: Hashable,
        *,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
    ) -> torch.Tensor:
        """SD3Transformer2DModel's forward, in the same operations and order, split after block 0."""
        _to_execution_device(transformer)
        height, width = hidden_states.shape[-2:]
        # Embeddings, as diffusers' forward computes them (pos_embed's output is not contiguous).
        h = transformer.pos_embed(hidden_states).contiguous()
        temb = transformer.time_text_embed(timestep, pooled_projections)
        context = transformer.context_embedder(encoder_hidden_states)

        blocks = transformer.transformer_blocks
        context, after_first = blocks[0](hidden_states=h, encoder_hidden_states=context, temb=temb)
        first_residual = after_first - h

        entry = self._entries.get(key)
        if entry is not None and self._may_reuse(entry, first_residual):
            entry.in_a_row += 1
            self.reused += 1
            h = after_first + entry.tail_residual
        else:
            h = after_first
            for block in blocks[1:]:
                context, h = block(hidden_states=h, encoder_hidden_states=context, temb=temb)
            tail = h - after_first
            if entry is None or entry.first_residual.shape != first_residual.shape:
                self._entries[key] = _Entry(first_residual=first_residual, tail_residual=tail)
            else:
                entry.first_residual, entry.tail_residual = first_residual, tail
                entry.whole += 1
                entry.in_a_row = 0
            self.computed += 1
        return _head(transformer, h, temb, height, width)

    def _may_reuse(self, entry: _Entry, first_residual: torch.Tensor) -> bool:
        policy = self.policy
        if entry.first_residual.shape != first_residual.shape:
            return False
        if entry.whole < policy.warmup or entry.in_a_row >= policy.max_consecutive:
            return False
        return relative_move(first_residual, entry.first_residual) < policy.threshold

    @property
    def skipped_share(self) -> float:
        """The share of forwards whose later blocks were skipped."""
        total = self.computed + self.reused
        return self.reused / total if total else 0.0


def relative_move(residual: torch.Tensor, reference: torch.Tensor) -> float:
    """mean|r − r_ref| / mean|r_ref|: the move a policy's threshold is compared with. Taken in fp32
    whatever the residuals' dtype, so that the cache and `benchmarks/step_cache_moves.py` judge alike."""
    reference = reference.float()
    return float((residual.float() - reference).abs().mean() / reference.abs().mean().clamp_min(1e-12))


def _head(transformer: Any, h: torch.Tensor, temb: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The final norm, projection and unpatchify of diffusers' forward: [B, C, H, W]."""
    h = transformer.proj_out(transformer.norm_out(h, temb))
    p = transformer.config.patch_size
    channels = transformer.out_channels
    h = h.reshape(h.shape[0], height // p, width // p, p, p, channels)
    h = torch.einsum("nhwpqc->nchpwq", h)
    return h.reshape(h.shape[0], channels, height, width)


def _to_execution_device(transformer: Any) -> None:
    """Under model CPU offload, accelerate moves the transformer to the GPU in a hook on its own
    `forward`, which calling its submodules bypasses: run that hook's move first. (Sequential
    offload hooks every submodule, which these calls do go through.)"""
    hook = getattr(transformer, "_hf_hook", None)
    if hook is not None:
        hook.pre_forward(transformer)
