"""Which SD3 family a loaded model belongs to, read from its transformer's structure.

The structure tells three families apart (the transformer config's `qk_norm` and
`dual_attention_layers`, as diffusers builds them): SD3 Medium has neither, SD3.5 Medium both
(MMDiT-X), SD3.5 Large only qk-norm. Depth and width do not enter, so the toy and tiny models are
recognised by the same rule as the real ones. Large Turbo is Large's architecture with distilled
weights: only the `model.family` setting, or a source whose name says "turbo", can tell it apart.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipelines.options import Family, FamilyChoice

# A declared family is accepted when the weights have this structure.
_STRUCTURE: dict[Family, Family] = {
    "sd3-medium": "sd3-medium",
    "sd3.5-large": "sd3.5-large",
    "sd3.5-large-turbo": "sd3.5-large",
    "sd3.5-medium": "sd3.5-medium",
}


class FamilyMismatch(ValueError):
    """The declared family is not what the weights are."""


def structural_family(transformer_config: Mapping[str, Any]) -> Family:
    """The family the transformer's structure says (Large for Large Turbo too)."""
    if not transformer_config.get("qk_norm"):
        return "sd3-medium"
    if transformer_config.get("dual_attention_layers"):
        return "sd3.5-medium"
    return "sd3.5-large"


def resolve_family(transformer_config: Mapping[str, Any], declared: FamilyChoice, *, source: str) -> Family:
    """The family to serve: the declared one if the weights have its structure, else what they are.

    With `auto`, SD3.5 Large weights whose source names "turbo" (stabilityai/stable-diffusion-3.5-
    large-turbo, sd3.5_large_turbo.safetensors) are Large Turbo; any other Large is Large.
    """
    found = structural_family(transformer_config)
    if declared == "auto":
        if found == "sd3.5-large" and "turbo" in source.lower():
            return "sd3.5-large-turbo"
        return found
    if _STRUCTURE[declared] != found:
        raise FamilyMismatch(
            f"the model family is set to {declared}, but these weights are {found} "
            f"({_describe(transformer_config)}): set the family to {found} or auto"
        )
    return declared


def _describe(config: Mapping[str, Any]) -> str:
    dual = config.get("dual_attention_layers") or ()
    return (
        f"{config.get('num_layers')} blocks, qk_norm {config.get('qk_norm')!r}, "
        f"{len(dual)} dual-attention blocks"
    )


_NAMED = re.compile(r"3\.?5[-_ ]?(large|medium)", re.IGNORECASE)


def expected_family(source: str, declared: FamilyChoice) -> Family:
    """The family a source will load as, known before loading it (the memory plan is chosen first):
    the setting; a twin's or random architecture's name; a local folder's transformer config; an id
    or file name that names SD3.5 Large (Turbo) or Medium; else SD3 Medium."""
    if declared != "auto":
        return declared
    name = source.split(":", 1)[1] if source.startswith(("tiny:", "random:")) else source
    config = Path(source).expanduser() / "transformer" / "config.json"
    if config.is_file():
        try:
            return resolve_family(json.loads(config.read_text()), "auto", source=source)
        except (OSError, ValueError):
            pass  # the load itself will say what is wrong with the folder
    match = _NAMED.search(name)
    if match is None:
        return "sd3-medium"
    if match.group(1).lower() == "medium":
        return "sd3.5-medium"
    return "sd3.5-large-turbo" if "turbo" in name.lower() else "sd3.5-large"
