"""SD3's joint attention, for the two ways the server replaces diffusers' processor: fused QKV
projections and query slicing.

diffusers 0.42.1's own fused processor (`FusedJointAttnProcessor2_0`, which `fuse_qkv_projections`
installs) is right for SD3 Medium only: it skips the RMS norms SD3.5 puts on queries and keys (a
different image), and it fails on SD3.5 Medium's image-only second attention, which has no context.
`fuse_projections` also keeps the layers it fuses: a second copy of about a sixth of the
transformer's weights. `JointAttention` does `JointAttnProcessor2_0`'s arithmetic for every family,
with or without fused layers, and `fuse_qkv` drops the layers the fused ones replace.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# The three projections each fused layer replaces, per stream.
_IMAGE = ("to_q", "to_k", "to_v")
_CONTEXT = ("add_q_proj", "add_k_proj", "add_v_proj")


def fuse_qkv(transformer: torch.nn.Module) -> int:
    """Fuse every attention's query, key and value projections (and its context stream's) into one
    matmul each; return how many attention modules were fused. Must precede quantizing and compiling,
    which must see the fused layers."""
    from diffusers.models.attention_processor import Attention

    fused = 0
    for module in transformer.modules():
        if isinstance(module, Attention) and not module.fused_projections:
            module.fuse_projections()
            for name in _IMAGE + (_CONTEXT if hasattr(module, "to_added_qkv") else ()):
                delattr(module, name)
            fused += 1
    transformer.set_attn_processor(JointAttention())  # type: ignore[operator]
    return fused


def _projected(attn: Any, x: torch.Tensor, *, context: bool) -> tuple[torch.Tensor, ...]:
    """One stream's queries, keys and values as [batch, heads, tokens, head_dim], normalised."""
    if attn.fused_projections:
        q, k, v = (attn.to_added_qkv if context else attn.to_qkv)(x).chunk(3, dim=-1)
    else:
        q, k, v = (getattr(attn, name)(x) for name in (_CONTEXT if context else _IMAGE))
    head_dim = q.shape[-1] // attn.heads
    q, k, v = (t.view(x.shape[0], -1, attn.heads, head_dim).transpose(1, 2) for t in (q, k, v))
    norm_q, norm_k = (attn.norm_added_q, attn.norm_added_k) if context else (attn.norm_q, attn.norm_k)
    if norm_q is not None:
        q = norm_q(q)
    if norm_k is not None:
        k = norm_k(k)
    return q, k, v


class JointAttention:
    """Image and text tokens attend to all tokens of both streams (SD3's MMDiT attention).

    With `query_chunk`, the softmax is computed for that many queries at a time, which bounds the
    attention matrix to chunk × N per head instead of N × N: what lets 2048² (16,538 tokens) run where
    the backend would materialise it. Either way the result is diffusers' up to float rounding.
    """

    def __init__(self, query_chunk: int | None = None) -> None:
        self.query_chunk = query_chunk

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        batch, image_tokens = hidden_states.shape[0], hidden_states.shape[1]
        q, k, v = _projected(attn, hidden_states, context=False)
        if encoder_hidden_states is not None:
            cq, ck, cv = _projected(attn, encoder_hidden_states, context=True)
            # Image tokens first, then text tokens: the order SD3's output split relies on.
            q, k, v = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)

        if self.query_chunk is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        else:
            out = torch.cat(
                [
                    F.scaled_dot_product_attention(part, k, v, dropout_p=0.0, is_causal=False)
                    for part in q.split(self.query_chunk, dim=2)
                ],
                dim=2,
            )
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * q.shape[-1]).to(q.dtype)

        image, text = out[:, :image_tokens], out[:, image_tokens:]
        image = attn.to_out[1](attn.to_out[0](image))
        if encoder_hidden_states is None:
            return image
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return image, text
