"""Reading fields of a Hugging Face model config, given either as a transformers config object or a dict.

The encoder configs here are built from HF configs (`from_hf`); accepting the plain config.json dict too means a
checkpoint directory can be described without instantiating transformers classes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


def hf_get(hf_config: Any, name: str, default: Any = dataclasses.MISSING) -> Any:
    """Returns field `name` of an HF config (object or dict); raises naming the field if absent and no default."""
    if isinstance(hf_config, Mapping):
        value = hf_config.get(name, default)
    else:
        value = getattr(hf_config, name, default)
    if value is dataclasses.MISSING:
        model_type = hf_get(hf_config, "model_type", "?") if name != "model_type" else "?"
        raise ValueError(f"HF config (model_type={model_type!r}) lacks the field {name!r}")
    return value
