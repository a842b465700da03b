"""`python -m anjax.corpus`: build the offline training corpus (`anjax.train.corpus`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from anjax import cli
from anjax.eval import tasks
from anjax.io.loading import load_tokenizer
from anjax.train import corpus
from anjax.train.corpus import PACKAGES


def eval_texts(data_dir: str | None = None) -> list[str]:
    """Every evaluation document as one text (its string fields joined): the 8 tasks'
    scored and demonstration documents, and the LAMBADA passages."""
    texts = []
    for name in tasks.TASKS:
        for doc in tasks.load_task(name, data_dir) + tasks.load_fewshot_pool(name, data_dir):
            texts.append(" ".join(corpus.strings(doc.fields)))
    return texts + tasks.lambada_texts(data_dir)


def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m anjax.corpus", description=cli.summary(__doc__))
    p.add_argument("--out", default="data/corpus", help="output directory (data.path for training)")
    p.add_argument("--cache", default="data/corpus_cache", help="downloaded and unpacked packages (reused)")
    p.add_argument("--packages", default=",".join(PACKAGES), help=f"comma-separated subset of {','.join(PACKAGES)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--validation-fraction", type=float, default=0.02)
    p.add_argument(
        "--eval-data", default=None, help="evaluation data directory (default: as anjax.eval.tasks finds it)"
    )
    args = p.parse_args(argv)
    packages = [x for x in args.packages.split(",") if x]
    try:
        if unknown := [x for x in packages if x not in PACKAGES]:
            raise ValueError(f"unknown package(s) {unknown}; known: {', '.join(PACKAGES)}")
        if not packages:
            raise ValueError("--packages is empty")
        if not 0 < args.validation_fraction < 1:
            raise ValueError(f"--validation-fraction must be in (0, 1), got {args.validation_fraction}")
        for tool in ("apt-get", "dpkg-deb"):
            if shutil.which(tool) is None:
                raise ValueError(f"{tool} not found: this script needs a Debian/Ubuntu system")
        summary = corpus.build(
            Path(args.out),
            Path(args.cache),
            packages,
            args.seed,
            args.validation_fraction,
            eval_texts(args.eval_data),
            load_tokenizer(None),
        )
    except subprocess.CalledProcessError as e:
        print(
            f"error: {' '.join(e.cmd)} failed: {(e.stderr or '').strip().splitlines()[-1:] or e.returncode}",
            file=sys.stderr,
        )
        return 2
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0
