"""Every command in the README's and docs' fenced `bash` blocks exists and accepts the flags it is shown with:
each Python entry point's `--help` (run in-process) names every `--flag` the docs pass it, and every shell
script they run exists."""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```bash\n(.*?)```", re.S)
SUBCOMMANDS = {"anjax.report"}  # `python -m anjax.report REPORT --flags`: each report has its own flags


def fenced_commands() -> list[tuple[str, list[str]]]:
    """(doc name, argv) for each command of each fenced bash block: continuation lines joined, comments and
    environment assignments dropped, `&&` chains split."""
    commands = []
    for doc in DOCS:
        for block in FENCE.findall(doc.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                for part in line.split("&&"):
                    argv = shlex.split(part, comments=True)
                    while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
                        argv = argv[1:]
                    if argv[:2] == ["nice", "-n"]:
                        argv = argv[3:]
                    if argv:
                        commands.append((doc.name, argv))
    return commands


def entry_point(argv: list[str]) -> tuple[str, str, list[str]] | None:
    """("module" | "script", name, arguments) of a Python command, None for anything else."""
    if not argv[0].endswith("python"):
        return None
    if argv[1] == "-m":
        return ("module", argv[2], argv[3:]) if argv[2].startswith("anjax") else None
    return "script", argv[1], argv[2:]


def help_text(kind: str, name: str, sub: tuple[str, ...] = ()) -> str:
    out = io.StringIO()
    old_argv = sys.argv
    sys.argv = [name, *sub, "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
            if kind == "module":
                runpy.run_module(name, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(str(ROOT / name), run_name="__main__")
    finally:
        sys.argv = old_argv
    assert exit_info.value.code in (0, None), f"{name} --help exited {exit_info.value.code}"
    return out.getvalue()


def test_the_docs_show_commands():
    commands = fenced_commands()
    assert len(commands) >= 20
    assert any(entry_point(argv) == ("script", "train.py", argv[2:]) for _, argv in commands)


def test_every_shell_script_the_docs_run_exists():
    for doc, argv in fenced_commands():
        if argv[0] == "bash":
            assert (ROOT / argv[1]).is_file(), f"{doc}: {argv[1]} does not exist"


def test_every_flag_the_docs_pass_is_in_the_commands_help():
    flags_by_command: dict[tuple[str, str, tuple[str, ...]], set[str]] = {}
    for _, argv in fenced_commands():
        ep = entry_point(argv)
        if ep is None:
            continue
        kind, name, args = ep
        sub = tuple(args[:1]) if name in SUBCOMMANDS else ()
        flags = {a.split("=")[0] for a in args if a.startswith("--")}
        flags_by_command.setdefault((kind, name, sub), set()).update(flags)
    assert ("module", "anjax.evaluate", ()) in flags_by_command
    missing = []
    for (kind, name, sub), flags in sorted(flags_by_command.items()):
        text = help_text(kind, name, sub)
        missing += [f"{name} {flag}" for flag in sorted(flags) if not re.search(re.escape(flag) + r"\b", text)]
    assert not missing, f"flags shown in the docs that the commands do not accept: {missing}"
