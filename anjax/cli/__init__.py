"""Shared CLI behaviour: bad input is one line `error: ...` on stderr and exit code 2.

Every command builds its parser with `ArgumentParser` (argparse errors become the
same one line; `--debug` is listed) and runs through `run(main)`: user errors
(ValueError, OSError) exit 2 (a full disk: "PATH: no space left on device"), anything
else exits 1 with one line, and the traceback is printed only with `--debug`; Ctrl-C
exits 130 at once, after which nothing more is written (`anjax.io.outputs.interrupt`).
The `check_*` functions validate paths before any model loads: an input must be a
readable file, an output must be creatable — probed by making and removing a file
where it will be written — and safe (`anjax.io.outputs.check_output`).
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from anjax.core import config
from anjax.core.config import ANCHOR_MODES, DTYPES
from anjax.io import outputs

DEBUG_FLAG = "--debug"


class UsageError(ValueError):
    """Bad input from the user; the message says what to do."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) and a `--debug` flag (tracebacks, handled by `run`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument(DEBUG_FLAG, action="store_true", help="show the traceback of an error")

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def summary(doc: str | None, paragraph: bool = False) -> str:
    """A parser's description: the first line (or first paragraph) of a docstring; "" when docstrings are
    stripped (python -OO)."""
    return (doc or "").split("\n\n" if paragraph else "\n")[0]


def one_line(e: BaseException) -> str:
    """The exception's message on one line."""
    return " ".join(part.strip() for part in str(e).splitlines() if part.strip()) or type(e).__name__


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> NoReturn:
    """Exit with `main(argv)`'s code; an exception becomes one `error:` line (exit 2 user error, 1 otherwise)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    previous = _on_ctrl_c()
    try:
        code = main(argv)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)  # not the interpreter's teardown, which can crash while JAX's threads still compute
    except Exception as e:  # noqa: BLE001 -- the one place a command's exceptions are turned into messages
        if DEBUG_FLAG in argv:
            traceback.print_exc()
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            print(f"error: {e.filename + ': ' if e.filename else ''}no space left on device", file=sys.stderr)
            sys.exit(2)
        if isinstance(e, (ValueError, OSError)):
            print(f"error: {one_line(e)}", file=sys.stderr)
            sys.exit(2)
        print(
            f"error: internal error ({type(e).__name__}: {one_line(e)}); rerun with {DEBUG_FLAG} for the traceback",
            file=sys.stderr,
        )
        sys.exit(1)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    sys.exit(code or 0)


def _on_ctrl_c():
    """Make Ctrl-C stop all writing (`outputs.interrupt`) as it raises KeyboardInterrupt, so that a command
    that swallows the exception still commits nothing; returns the previous handler (None off the main
    thread, where signals cannot be handled)."""

    def handler(signum, frame):
        outputs.interrupt()
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, handler)


def add_run_config_args(parser: argparse.ArgumentParser, config_help: str, set_example: str) -> None:
    """`--config FILE` and repeatable `--set KEY=VALUE ...` (a run config: `anjax.train.run_config.load`)."""
    parser.add_argument("--config", default=None, help=config_help)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config field, e.g. --set {set_example}",
    )


def overrides(args: argparse.Namespace) -> list[str]:
    """Every `--set` KEY=VALUE of `add_run_config_args`, in order."""
    return [o for group in args.overrides for o in group]


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The flags every inference command (infer.py, serve, evaluate, quality) shares, with one name, default and
    help each (a test holds them equal): the model, how it is held (`--dtype`, `--mesh`) and its anchor scheme
    (`--anchor-mode`, `--anchors`: `anjax.text.anchors.resolve_scheme`). `EngineConfig.from_args` reads them; the
    lm-eval adapter takes the same names as model_args."""
    parser.add_argument(
        "--model", default=None, help="HF directory, GGUF file or anjax run (default: the embedded SmolLM2-135M)"
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="parameters and compute; attention softmax, norms and logits stay float32 (default float32)",
    )
    parser.add_argument(
        "--mesh",
        type=parse_mesh,
        default=None,
        metavar="data=D,tensor=T",
        help="run over D x T devices: rows (and KV-cache rows) over data, weights and KV heads over tensor "
        "(T must divide the KV heads); default one device",
    )
    parser.add_argument(
        "--anchor-mode",
        choices=ANCHOR_MODES,
        default=None,
        help="override the model's anchor mode (none: no anchors; default: the model's)",
    )
    parser.add_argument(
        "--anchors", nargs="+", default=None, help="EP anchor strings, overriding the model's (default . ? !)"
    )


def add_policy_args(parser: argparse.ArgumentParser) -> None:
    """The training-free cache policies' settings (`anjax.inference.policies.Policy`), shared by infer.py and
    evaluate; None (not given) keeps the policy's default."""
    parser.add_argument(
        "--sink", type=int, default=None, help="window and sepllm: first tokens always kept (default 4)"
    )
    parser.add_argument(
        "--obs", type=int, default=None, help="snapkv: observation window, last prompt tokens (default 8)"
    )
    parser.add_argument("--kernel", type=int, default=None, help="snapkv: average-pool kernel, odd (default 5)")


def parse_mesh(text: str) -> dict[str, int]:
    """`data=D,tensor=T` (either may be left out: 1; `anjax.core.config.parse_mesh`) -> {"data": D, "tensor": T};
    argparse's one-line error else."""
    try:
        return config.parse_mesh(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ----------------------------------------------------------------------------- argument checks


def check_range(
    name: str, value: float | None, low: float | None = None, high: float | None = None, low_open: bool = False
) -> None:
    """UsageError unless low <= value <= high (low < value with `low_open`) and finite; None passes."""
    if value is None:
        return
    if not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise UsageError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise UsageError(f"{name} must be <= {high}, got {value}")


def check_seed(name: str, seed: int) -> None:
    check_range(name, seed, 0, 2**32 - 1)


def check_readable_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path when it is a file this process can read, else UsageError naming `what`."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"{what} {p}: no such file")
    if not p.is_file():
        raise UsageError(f"{what} {p}: not a file")
    try:
        with open(p, "rb"):
            pass
    except OSError as e:
        raise UsageError(f"{what} {p}: cannot be read ({e.strerror})") from None
    return p


def _probe_dir(directory: Path, what: str, target: Path) -> None:
    """Create and remove a file in the nearest existing ancestor of `directory`; UsageError when it cannot."""
    d = directory
    while not d.exists():
        d = d.parent
    if not d.is_dir():
        raise UsageError(f"{what} {target}: {d} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".anjax-probe-", dir=d)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{what} {target}: cannot write in {d} ({e.strerror})") from None


def _safe_output(path, what: str, inputs=()) -> Path:
    try:
        return outputs.check_output(path, what, inputs)
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_writable_file(path: str | os.PathLike, what: str, inputs=()) -> Path:
    """`path` (absolute) when a file can be written there (parents are created on writing) and it is none of
    `inputs` ((flag, path) pairs, `outputs.check_output`), else UsageError."""
    p = _safe_output(path, what, inputs)
    if p.is_dir():
        raise UsageError(f"{what} {p}: is a directory, not a file")
    _probe_dir(p.parent, what, p)
    return p


def check_creatable(path: str | os.PathLike, what: str) -> Path:
    """`path` (absolute) when something (a file or a directory) can be created there, else UsageError."""
    p = _safe_output(path, what)
    _probe_dir(p.parent, what, p)
    return p


def check_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """`path` (absolute) when files can be written in it (created on writing if missing), else UsageError."""
    p = _safe_output(path, what)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{what} {p}: exists and is not a directory")
    _probe_dir(p, what, p)
    return p
