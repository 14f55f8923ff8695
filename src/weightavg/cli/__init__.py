"""The ``weightavg`` command line (``[project.scripts] weightavg = "weightavg.cli:main"``)."""

from ._main import build_parser, cmd_average, cmd_demo, cmd_plot_lr, main

__all__ = ["build_parser", "cmd_average", "cmd_demo", "cmd_plot_lr", "main"]
