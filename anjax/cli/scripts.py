"""The installed commands (`[project.scripts]` in pyproject.toml), one per `python -m` / script form.

    anjax-train = python train.py          anjax-infer = python infer.py
    anjax-eval = python -m anjax.evaluate  anjax-serve = python -m anjax.serve
    anjax-export = python -m anjax.export  anjax-aot = python -m anjax.aot
    anjax-prepare = python -m anjax.prepare

Each runs its module's `main` through `cli.run` (one-line errors, exit codes). The module is imported
when the command runs, so that one command's `--help` loads nothing of the others.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import NoReturn

from anjax import cli

# command -> the module whose `main(argv)` it runs (the module behind its `python -m` / script form)
COMMANDS = {
    "anjax-train": "anjax.cli.train",
    "anjax-infer": "anjax.cli.infer",
    "anjax-eval": "anjax.cli.evaluate",
    "anjax-serve": "anjax.cli.serve",
    "anjax-export": "anjax.cli.export",
    "anjax-aot": "anjax.aot.__main__",
    "anjax-prepare": "anjax.cli.prepare",
}


def _entry(command: str) -> Callable[[], NoReturn]:
    """The console-script function of `command`: its module's `main` through `cli.run`."""

    def run() -> NoReturn:
        cli.run(importlib.import_module(COMMANDS[command]).main)

    run.__name__ = command.removeprefix("anjax-")
    return run


train, infer, evaluate = _entry("anjax-train"), _entry("anjax-infer"), _entry("anjax-eval")
serve, export, aot, prepare = (
    _entry("anjax-serve"),
    _entry("anjax-export"),
    _entry("anjax-aot"),
    _entry("anjax-prepare"),
)
