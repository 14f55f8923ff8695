"""Live progress of the demo: rich when installed, else tqdm, else plain lines (all on stderr)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["NullProgress", "PlainProgress", "RichProgress", "TqdmProgress", "make_progress"]


class NullProgress:
    """Reports nothing."""

    def start(self, total: int) -> None:
        pass

    def advance(self, description: str) -> None:
        pass

    def log(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class PlainProgress:
    """A line per logged event and a percentage every few seconds (for logs and dumb terminals)."""

    def __init__(self, stream: TextIO | None = None, every_s: float = 5.0) -> None:
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self.total = 0
        self.done = 0
        self.t0 = self.last = 0.0

    def start(self, total: int) -> None:
        self.total, self.done = total, 0
        self.t0 = self.last = time.perf_counter()

    def advance(self, description: str) -> None:
        self.done += 1
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            pct = 100.0 * self.done / max(1, self.total)
            print(f"  {pct:5.1f}%  {description}  ({now - self.t0:.0f} s)", file=self.stream, flush=True)

    def log(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        pass


class RichProgress:
    """A rich progress bar over seeds x methods x epochs; logged lines scroll above it."""

    def __init__(self, stream: TextIO | None = None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = Console(file=stream or sys.stderr)
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("epochs"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console, transient=False,
        )
        self.task: Any = None

    def start(self, total: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task("starting", total=total)

    def advance(self, description: str) -> None:
        self.progress.update(self.task, advance=1, description=description)

    def log(self, text: str) -> None:
        self.progress.console.print(text, highlight=False, markup=False)

    def close(self) -> None:
        self.progress.stop()


class TqdmProgress:
    """A tqdm bar (used when rich is missing and tqdm is installed)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.bar: Any = None

    def start(self, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, file=self.stream, unit="epoch")

    def advance(self, description: str) -> None:
        self.bar.set_description(description, refresh=False)
        self.bar.update(1)

    def log(self, text: str) -> None:
        self.bar.write(text, file=self.stream)

    def close(self) -> None:
        self.bar.close()


def make_progress(kind: str = "auto", stream: TextIO | None = None) -> Any:
    """``"auto"``, ``"rich"``, ``"tqdm"``, ``"plain"`` or ``"none"``.

    ``"auto"`` is rich, else tqdm, else plain lines on a terminal, and plain lines otherwise.
    """
    import importlib.util

    stream = stream or sys.stderr
    if kind == "none":
        return NullProgress()
    if kind == "plain":
        return PlainProgress(stream)
    tty = bool(getattr(stream, "isatty", lambda: False)())
    if kind == "auto" and not tty:
        return PlainProgress(stream)  # logs and pipes: no redrawn bar
    if kind in ("auto", "rich") and importlib.util.find_spec("rich") is not None:
        return RichProgress(stream)
    if kind in ("auto", "tqdm") and importlib.util.find_spec("tqdm") is not None:
        return TqdmProgress(stream)
    return PlainProgress(stream)
