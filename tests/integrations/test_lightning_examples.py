"""examples/lightning_swa.py: the seed's Lightning SWA configuration and its learning-rate curve."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest

pytest.importorskip("lightning.pytorch")

from weightavg._schedules import swa_anneal_lr

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*")


def test_lightning_swa_example_gives_the_described_curve() -> None:
    path = Path(__file__).resolve().parents[2] / "examples" / "lightning_swa.py"
    spec = importlib.util.spec_from_file_location("example_lightning_swa", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lrs = module.main(batches=2)
    assert len(lrs) == 20
    assert lrs[:2] == [0.1, 0.1]
    assert lrs[11:] == pytest.approx([0.001] * 9)
    assert lrs[2:11] == pytest.approx([swa_anneal_lr(0.1, 0.001, e, 10, "cos") for e in range(1, 10)])
    steps = [a - b for a, b in itertools.pairwise(lrs[1:13])]
    assert steps[4] > steps[0] and steps[4] > steps[9]  # cosine: slow, fast, slow
