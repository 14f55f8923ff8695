"""Collection rules for the docstring examples (``--doctest-modules`` over ``src/weightavg``).

A module whose optional dependency is not installed is not collected (its examples are skipped
rather than failing at import), so the suite runs with only the hard dependency present.
"""

from __future__ import annotations

import importlib.util

# package module (relative to this file) -> the optional top-level packages it imports at load time
_OPTIONAL = {
    "src/weightavg/lightning.py": ("lightning",),
    "src/weightavg/transformers.py": ("transformers", "accelerate"),
    "src/weightavg/demo": ("numpy", "mnist1d", "sklearn"),
    "src/weightavg/_fused_triton.py": ("triton",),
}

collect_ignore = [path for path, deps in _OPTIONAL.items()
                  if any(importlib.util.find_spec(d) is None for d in deps)]
