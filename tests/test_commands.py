"""Every command has one shape: the `[project.scripts]` commands run the modules behind the `python -m` /
script forms, and the inference commands share their flags (one name, default and help each)."""

from __future__ import annotations

import importlib
import importlib.metadata
import tomllib
from pathlib import Path

import pytest

from anjax.cli import evaluate, infer, quality, scripts, serve
from anjax.inference.engine import EngineConfig

ROOT = Path(__file__).resolve().parents[1]
PARSERS = {
    "infer": infer.build_parser(),
    "serve": serve.build_parser(),
    "evaluate": evaluate.build_parser(),
    "quality": quality.build_parser(),
}
SHARED = {  # flag -> the commands that must all have it, identically (`cli.add_engine_args`, `add_policy_args`)
    **dict.fromkeys(("--model", "--dtype", "--mesh", "--anchor-mode", "--anchors"), tuple(PARSERS)),
    **dict.fromkeys(("--sink", "--obs", "--kernel"), ("infer", "evaluate")),
}
# flags that several commands have with a different meaning or default, on purpose
DIFFERENT = {
    "--cache": "infer: one kind; serve: anchor or full; evaluate: a list, one table row each",
    "--budget": "infer: slots or a fraction; evaluate: a list of fractions and match-anchor",
    "--chunk-size": "default 512 generating (the engine's), 256 serving, 128 scoring short documents",
    "--batch-size": "infer: prompts per batch; evaluate, quality: items (each scored with its choices)",
    "--capacity": "infer: optional, a row's slots; serve: each decode slot's",
    "--json": "infer: print JSON (a switch); evaluate: a report file",
    "--seed": "infer: sampling; evaluate: few-shot sampling",
    "--limit": "evaluate: all documents or passages by default; quality: 200 documents (--ppl-limit: passages)",
    "--ppl-data": "quality: embedded by default; evaluate: lambada",
    "--out-dir": "quality writes benchmarks/results by default; evaluate only when asked",
    "--name": "the file stem's default is the command's name",
}


def pyproject_scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_each_installed_command_runs_a_commands_main():
    declared = pyproject_scripts()
    assert set(declared) == set(scripts.COMMANDS)
    for name, target in declared.items():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), name
        assert callable(importlib.import_module(scripts.COMMANDS[name]).main), name
    installed = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    if any(name in installed for name in declared):  # `pip install -e .` (setup.sh) agrees with pyproject.toml
        assert {n: installed.get(n) for n in declared} == declared


def _flags(parser) -> dict[str, tuple]:
    return {
        flag: (a.dest, a.default, a.help, a.choices, a.nargs, a.type, a.metavar)
        for a in parser._actions
        for flag in a.option_strings
    }


def _all_equal(values: list) -> bool:
    return all(v == values[0] for v in values)


def test_the_inference_commands_share_their_flags():
    flags = {command: _flags(p) for command, p in PARSERS.items()}
    for flag, commands in SHARED.items():
        assert _all_equal([flags[c][flag] for c in commands]), f"{flag} differs between {', '.join(commands)}"
    for flag in set().union(*flags.values()) - set(SHARED) - set(DIFFERENT) - {"-h", "--help", "--debug"}:
        having = [c for c in flags if flag in flags[c]]
        assert _all_equal([flags[c][flag] for c in having]), f"{flag} differs between {', '.join(having)}"


def test_engine_config_from_the_flags():
    argv = ["--prompt", "x", "--cache", "window", "--budget", "0.25", "--sink", "2", "--anchor-mode", "none"]
    config = EngineConfig.from_args(infer.build_parser().parse_args(argv + ["--raw-prompt", "--capacity", "96"]))
    assert config == EngineConfig(
        cache="window", budget=0.25, policy_sink=2, anchor_mode="none", raw_prompts=True, capacity=96
    )
    assert EngineConfig.from_args(serve.build_parser().parse_args(["--cache", "full"])) == EngineConfig(
        cache="full", chunk_size=256, capacity=1024
    )
    with pytest.raises(ValueError, match="budget and policy settings"):
        EngineConfig.from_args(infer.build_parser().parse_args(["--prompt", "x", "--sink", "2"]))
