"""The public surface: `import weightavg` stays light, and the catalogue is explicit."""

from __future__ import annotations

import json
import subprocess
import sys

import weightavg

HEAVY = ["lightning", "pytorch_lightning", "transformers", "matplotlib", "rich", "tqdm", "mnist1d",
         "sklearn", "safetensors", "numpy", "scipy", "accelerate"]


def _loaded(imports: str) -> set[str]:
    code = f"import sys, json; {imports}; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


def test_import_loads_no_optional_dependency() -> None:
    """Nothing beyond what `import torch` itself loads (torch 2.13 loads numpy and tqdm)."""
    baseline = _loaded("import torch")
    ours = _loaded("import weightavg, weightavg.swa_utils, weightavg.lowp, weightavg.metrics, weightavg.functional")
    assert ours - baseline == set()


def test_all_is_explicit_and_importable() -> None:
    assert len(set(weightavg.__all__)) == len(weightavg.__all__)
    for name in weightavg.__all__:
        assert hasattr(weightavg, name), name
    assert sorted(weightavg.__all__, key=str.lower) == sorted(weightavg.__all__, key=str.lower)
