"""`python -m anjax.lm_eval_adapter`: lm-eval's command line with the "anjax" model registered.

The model itself is `anjax.eval.lm_eval_adapter.AnjaxLM`.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import tempfile

from anjax import cli
from anjax.eval import lm_eval_tasks
from anjax.eval.lm_eval_adapter import AnjaxLM, check_model_args

DATA_FLAG = "--anjax-data"


def precheck_model_args(argv: list[str]) -> None:
    """With `--model anjax`, check `--model_args` as AnjaxLM will, before the harness starts."""

    from lm_eval.utils import simple_parse_args_string

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model")
    pre.add_argument("--model_args", "-a", nargs="+", default=[])
    known, _ = pre.parse_known_args(argv)
    if known.model != "anjax":
        return
    given = simple_parse_args_string(",".join(known.model_args))
    params = inspect.signature(AnjaxLM.__init__).parameters
    names = set(params) - {"self", "unknown", "scoring_model"}
    value = lambda k: given.get(k, params[k].default)
    check_model_args(
        value("model"),
        value("cache"),
        value("batch_size"),
        value("chunk_size"),
        {k: v for k, v in given.items() if k not in names},
        value("dtype"),
    )


def main(argv: list[str] | None = None) -> int:
    """`lm_eval`'s own command line, with the "anjax" model registered and, unless `--anjax-data hub`
    or there is no local data, the harness's tasks on the local benchmark data."""
    from lm_eval.__main__ import cli_evaluate

    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != cli.DEBUG_FLAG]
    source = "auto"
    if DATA_FLAG in argv:
        i = argv.index(DATA_FLAG)
        source = argv[i + 1] if i + 1 < len(argv) else ""
        if source not in ("auto", "local", "hub"):
            raise cli.UsageError(f"{DATA_FLAG} must be auto, local or hub, got {source!r}")
        del argv[i : i + 2]
    precheck_model_args(argv)
    with tempfile.TemporaryDirectory(prefix="anjax-lm-eval-tasks-") as include:
        if source != "hub" and "--include_path" not in argv and lm_eval_tasks.local_data_available(source == "local"):
            argv += ["--include_path", str(lm_eval_tasks.write_local_tasks(include))]
        sys.argv = ["lm_eval", *argv]
        cli_evaluate()
    return 0
