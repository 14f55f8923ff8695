"""Greedy soups and weighted checkpoint averages (API and `weightavg average` flags)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import weightavg as wa
from weightavg._window import window_weights
from weightavg.cli._main import main


def _ingredients(n: int = 6) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, generator=g)
    return [{"w": base + 0.5 * torch.randn(8, generator=g), "b": torch.randn(2, generator=g),
             "steps": torch.tensor(i)} for i in range(n)]


TARGET = torch.linspace(-1, 1, 8)


def _score(sd: dict[str, torch.Tensor]) -> float:
    return -float((sd["w"] - TARGET).norm())


def _reference_greedy(models: list[dict[str, torch.Tensor]]) -> tuple[list[int], torch.Tensor]:
    """The procedure written out with plain means (no engine)."""
    scores = [_score(m) for m in models]
    order = sorted(range(len(models)), key=lambda i: -scores[i])
    chosen = [order[0]]
    best = scores[order[0]]
    for i in order[1:]:
        cand = torch.stack([models[j]["w"] for j in [*chosen, i]]).mean(0)
        s = _score({"w": cand})
        if s >= best:
            chosen.append(i)
            best = s
    return chosen, torch.stack([models[j]["w"] for j in chosen]).mean(0)


def test_greedy_soup_matches_the_procedure() -> None:
    models = _ingredients()
    models.append({"w": torch.full((8,), 50.0), "b": torch.zeros(2), "steps": torch.tensor(9)})  # a bad one
    soup = wa.greedy_soup(models, _score)
    chosen, expected = _reference_greedy(models)
    assert soup.members == chosen
    assert 6 not in soup.members
    torch.testing.assert_close(soup.state_dict["w"], expected)
    assert soup.soup_score == pytest.approx(_score({"w": expected}))
    assert soup.scores == [pytest.approx(_score(m)) for m in models]
    assert len(soup.history) == len(models) - 1
    assert soup.soup_score >= max(soup.scores)  # never worse than the best ingredient
    assert json.dumps(soup.summary())


def test_greedy_soup_bad_inputs() -> None:
    with pytest.raises(wa.ConfigError, match="models"):
        wa.greedy_soup([], _score)
    with pytest.raises(wa.ConfigError, match="finite"):
        wa.greedy_soup(_ingredients(2), lambda sd: math.nan)
    with pytest.raises(wa.MismatchError):
        wa.greedy_soup([{"w": torch.zeros(3)}, {"v": torch.zeros(3)}], lambda sd: 0.0)


def _save(tmp: Path, models: list[dict[str, torch.Tensor]]) -> list[str]:
    paths = []
    for i, m in enumerate(models):
        p = tmp / f"ckpt_{i}.pt"
        torch.save(m, p)
        paths.append(str(p))
    return paths


def test_cli_weights_and_schedule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = _ingredients(5)
    paths = _save(tmp_path, models)
    w = [1.0, 0.0, 2.0, 3.0, 0.5]
    assert main(["average", *paths, "-o", str(tmp_path / "w.pt"), "--weights", ",".join(map(str, w)), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "weighted" and len(report["inputs"]) == 4  # the zero weight is not read
    got = torch.load(tmp_path / "w.pt", weights_only=True)
    expected = sum(wi * m["w"].double() for wi, m in zip(w, models, strict=True)) / sum(w)
    torch.testing.assert_close(got["w"].double(), expected, rtol=1e-6, atol=1e-6)
    assert int(got["steps"]) == 4

    assert main(["average", *paths, "-o", str(tmp_path / "s.pt"), "--schedule", "minus-sqrt", "--last", "3"]) == 0
    got = torch.load(tmp_path / "s.pt", weights_only=True)
    ws = window_weights("minus-sqrt", 3)
    expected = sum(wi * m["w"].double() for wi, m in zip(ws, models[-3:], strict=True))
    torch.testing.assert_close(got["w"].double(), expected, rtol=1e-6, atol=1e-6)

    assert main(["average", *paths, "-o", str(tmp_path / "x.pt"), "--weights", "1,2"]) == 1
    assert "--weights" in capsys.readouterr().err
    assert main(["average", *paths, "-o", str(tmp_path / "x.pt"), "--weights", "1,1,1,1,1", "--ema", "0.9"]) == 1
    assert not (tmp_path / "x.pt").exists()


def test_cli_greedy_soup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = _ingredients(5)
    models.append({"w": torch.full((8,), 50.0), "b": torch.zeros(2), "steps": torch.tensor(9)})
    paths = _save(tmp_path, models)
    scorer = tmp_path / "scorer.py"
    scorer.write_text("import torch\nT = torch.linspace(-1, 1, 8)\n"
                      "def score(sd):\n    return -float((sd['w'] - T).norm())\n")
    assert main(["average", *paths, "-o", str(tmp_path / "soup.pt"), "--greedy", "--eval",
                 f"{scorer}:score", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    chosen, expected = _reference_greedy(models)
    assert report["method"] == "greedy_soup"
    assert report["greedy"]["members"] == [paths[i] for i in chosen]
    assert set(report["greedy"]["scores"]) == set(paths)
    got = torch.load(tmp_path / "soup.pt", weights_only=True)
    torch.testing.assert_close(got["w"], expected)
    assert main(["average", *paths, "-o", str(tmp_path / "y.pt"), "--greedy"]) == 1
    assert main(["average", *paths, "-o", str(tmp_path / "y.pt"), "--greedy", "--eval", "nosuchmod_xyz:f"]) == 1
    assert "importable" in capsys.readouterr().err
