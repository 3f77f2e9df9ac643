"""mixstream: streaming data loading with live, exact, resumable data-mixture control.

Top-level names are imported lazily so light modules (``mixstream.manifest``,
``mixstream.testing``) do not pull in torch and streaming.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "DynamicStreamingDataset": "mixstream.dataset",
    "MixtureStateError": "mixstream.dataset",
    "Manifest": "mixstream.manifest",
    "ManifestError": "mixstream.manifest",
    "WeightSchedule": "mixstream.weights",
    "normalize_weights": "mixstream.weights",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mixstream' has no attribute {name!r}")
