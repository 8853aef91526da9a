"""fps: select the few weights of a pretrained vision model worth fine-tuning, in one forward pass.

The package imports lazily so that ``fps --help`` never imports torch; the public names below resolve on
first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_mask": ".formats",
    "read_mask": ".formats",
    "save_mask": ".formats",
    "read_scores": ".formats",
    "read_gradient_scores": ".formats",
    "Mask": ".formats",
    "ModelSpec": ".models",
    "create_model": ".models",
    "SelectOptions": ".options",
    "TrainConfig": ".options",
    "run_select": ".selector",
    "reselect": ".selector",
    "build_mask": ".selector",
    "parameter_roles": ".candidates",
    "collect_input_stats": ".activations",
    "select": ".selection",
    "make_scores": ".scoring",
    "collect_gradients": ".gradients",
    "compare_masks": ".compare",
    "MaskComparison": ".compare",
    "read_delta": ".formats",
    "load_merged": ".merge",
    "merge_into": ".merge",
    "run_merge": ".merge",
    "inspect_files": ".inspection",
    "select_indices": ".indices",
    "export_peft": ".peft_adapter",
    "FpsError": ".errors",
    "OptionsError": ".errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
