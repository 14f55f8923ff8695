"""Start-up of the ``weightavg`` command, before torch is imported (this module imports no torch).

``import weightavg`` imports torch, which takes a second or more; the command's own handlers are
installed only once :func:`weightavg.cli.main` runs. When this process *is* the command
(``weightavg ...`` or ``python -m weightavg ...``), this module makes Ctrl-C and SIGTERM during
that first second end the process quietly (exit status 130 / 143, no traceback), and hides
torch's "Failed to initialize NumPy" warning, which a torch-only install (no numpy, which
weightavg does not need) would print on every command. In any other process it does nothing.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from typing import Any

__all__ = ["is_command"]


def is_command() -> bool:
    """True when this process runs the ``weightavg`` command line."""
    argv0 = os.path.basename(sys.argv[0]) if sys.argv else ""
    if argv0 in ("weightavg", "weightavg.exe", "weightavg-script.py"):
        return True
    orig = list(getattr(sys, "orig_argv", []))
    i = 1
    while i < len(orig):
        a = orig[i]
        if a == "-m":
            return i + 1 < len(orig) and orig[i + 1] in ("weightavg", "weightavg.__main__")
        if a in ("-mweightavg", "-mweightavg.__main__"):
            return True
        if a in ("-X", "-W"):  # options that take a separate value
            i += 2
            continue
        if a == "-c" or not a.startswith("-"):
            return False
        i += 1
    return False


def _quiet_exit(status: int) -> Any:
    def handler(signum: int, frame: Any) -> None:
        try:
            name = "interrupted" if signum == signal.SIGINT else "terminated"
            os.write(2, f"weightavg: {name} while starting\n".encode())
        finally:
            os._exit(status)

    return handler


def _install() -> None:
    if not is_command():
        return
    try:
        signal.signal(signal.SIGINT, _quiet_exit(130))
        signal.signal(signal.SIGTERM, _quiet_exit(143))
    except (ValueError, OSError):  # not the main thread: leave the defaults
        pass
    # torch warns when numpy is missing; weightavg never needs numpy
    warnings.filterwarnings("ignore", message=r"Failed to initialize NumPy", category=UserWarning)


_install()
