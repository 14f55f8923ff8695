"""The public surface: `import weightavg` stays light, and the catalogue is explicit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
    ours = _loaded("import weightavg, weightavg.swa_utils, weightavg.lowp, weightavg.metrics, "
                   "weightavg.functional")
    assert ours - baseline == set()


PUBLIC = [
    "EMA", "SWA", "SWAG", "Averager", "AveragingPolicy", "ConfigError", "Duration", "FastSWALR",
    "MismatchError", "MultiSWA", "MultiSWAG", "NonFiniteError", "PostHocEMA", "Rule", "SWAAnnealLR", "SWACyclicLR",
    "StateError", "SubspaceInference", "UpdateInfo", "WeightAvgError", "WindowAverage", "__version__", "bma_predict",
    "canonical_name", "custom", "ema", "ema_warmup", "greedy_soup", "has_running_stats", "inplace", "karras_ema",
    "make_contiguous", "mean", "named_tensors", "recompute_bn", "sigma_rel_to_gamma", "unwrap_model",
]


def test_all_is_pinned_and_importable() -> None:
    """Adding or removing a public name is a decision: update PUBLIC with it."""
    assert weightavg.__all__ == PUBLIC
    for name in weightavg.__all__:
        assert hasattr(weightavg, name), name


@pytest.mark.parametrize(("module", "missing", "extra"), [
    ("weightavg.lightning", "lightning", "weightavg[lightning]"),
    ("weightavg.transformers", "transformers", "weightavg[transformers]"),
])
def test_a_front_end_without_its_framework_names_the_extra(module: str, missing: str, extra: str) -> None:
    code = (f"import sys; sys.modules[{missing!r}] = None\n"
            f"try:\n    import {module}\nexcept ModuleNotFoundError as e:\n    print('ERR', e.name, e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.startswith(f"ERR {missing}"), out
    assert extra in out and "pip install" in out, out
