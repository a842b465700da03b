"""Perplexity on long held-out text through the engine, with a full and an anchor cache.

    python -m anjax.evaluate --perplexity --cache full,anchor --anchor-mode ep --limit 200
    python -m anjax.evaluate --perplexity --cache full,anchor --anchor-mode ac --ac-every 32
    python -m anjax.evaluate --perplexity --cache full,anchor --ppl-data embedded
    python -m anjax.evaluate --perplexity --cache full,anchor,window,snapkv,h2o --budget match-anchor,0.1

Text (`--ppl-data`): LAMBADA (OpenAI) test passages (`lambada`, the default), the
embedded corpus' held-out validation split (`embedded`), or local text files
(anything `anjax.train.data.load_corpus` reads; field `text`). Each passage is encoded
like training data (AC: `<AC>`
after every sentence, and with `--ac-every N` after every N tokens of a longer
one), joined by a blank line into one stream and cut into rows of `--seq-len`
tokens (the last row may be shorter). Each row is fed through chunked prefill
(`anjax.inference.scoring.Scorer.sequence_nll`): every token is predicted from the cache
as it stands, so the anchor row is the model's perplexity under the AnSAN mask,
reached with a compacted cache. Scored targets: every text token after the
row's first; inserted `<AC>` targets are not scored (they are not text), so
every mode scores the same text (AC tokenization may split a few sentence
boundaries differently: the token counts can differ slightly). C↓ = 1 − slots
held at the end of the rows / row tokens.

The training-free policies (`anjax.inference.policies`) stream each row (`--budget`: one table row
POLICY@BUDGET per policy and budget): every chunk of `--policy-chunk` tokens is prefilled with full attention
against the kept slots, then every layer and KV head is cut back to the row's budget. The default, 1, is
eviction after every token (H2O's decode-time rule): no token sees more than the budget and itself, as the
anchor cache's tokens see no more than its slots; a chunk of T lets a token also see up to T − 1 tokens
outside the budget (at T = 128, h2o's perplexity gap to the full cache shrank tenfold in a check).
A fraction F keeps max(1, ⌊F × row tokens⌋) slots;
`match-anchor` the slots the anchor cache holds at the row's end (`anjax.eval.evaluate.row_budgets`).
The anchor cache's slots grow with the anchors: at its end it holds at least what it held after any
earlier anchor (more only mid-sentence, while the open sentence outnumbers the anchors still to come
plus the row's last open sentence), while the policy holds every token until the budget is reached; so
the match favours the policy slightly.

Every cache scores the same rows, so anchor / full perplexity is paired: its
95% interval (like each perplexity's) is a bootstrap over rows (`anjax.eval.stats`,
seeded): ratio = exp((Σ NLL_anchor − Σ NLL_full) / Σ tokens) over resampled rows.

With `--out-dir`, each finished cache's per-row scores are saved in OUT_DIR/NAME.caches/ with what they depend on
(`resumable`): a rerun of the same command scores only the caches it lacks.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from anjax.eval import resume, stats, tasks
from anjax.eval.evaluate import SEPLLM, parse_budget, policy_of, row_budgets, sepllm_of, sepllm_scorer
from anjax.inference.policies import Policy, SepLLM
from anjax.inference.scoring import Scorer, ScoringModel
from anjax.train import data

SOURCES = {"lambada": "LAMBADA test passages", "embedded": "the embedded corpus' validation split"}


def held_out_texts(source: str, data_dir: str | None = None, limit: int | None = None) -> list[str]:
    """The passages of `--ppl-data`: "lambada", "embedded" or local files (their `text` field)."""
    if source == "lambada":
        return tasks.lambada_texts(data_dir, limit)
    texts = data.load_corpus(
        data.DataConfig(path=None if source == "embedded" else source),
        "validation" if source == "embedded" else "train",
    )
    if "text" not in texts.column_names:
        raise ValueError(f"--ppl-data {source}: no 'text' field (fields: {', '.join(texts.column_names)})")
    texts = [t for t in texts["text"][:limit] if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError(f"--ppl-data {source}: no text")
    return texts


def text_rows(
    model: ScoringModel, texts: Sequence[str], seq_len: int, ac_every: int | None = None
) -> tuple[list[list[int]], list[list[bool]]]:
    """(rows of ids, scored flags): passages joined by a blank line, cut every `seq_len` ids."""
    if not texts:
        raise ValueError("no text to score")
    sep = model.tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for text in texts:
        stream += (sep if stream else []) + model.encode_text(text, ac_every)[int(model.add_bos) :]
    bos = [model.tokenizer.bos_token_id] if model.add_bos else []
    width = seq_len - len(bos)
    rows = [bos + stream[i : i + width] for i in range(0, len(stream), width)]
    rows = [r for r in rows if len(r) >= 2]
    ac = model.ac_id
    scored = [[t > 0 and (r[t] != ac) for t in range(len(r))] for r in rows]
    return rows, scored


def perplexity(
    scorer: Scorer,
    rows,
    scored,
    caches: Sequence[str],
    samples: int = stats.SAMPLES,
    seed: int = stats.SEED,
    policies: dict[str, Policy | SepLLM] | None = None,
    streamer: Scorer | None = None,
    saved: Callable[[str, Callable[[], dict]], dict] | None = None,
) -> dict[str, dict]:
    """{cache: ppl and its interval, nll per token, scored tokens, C↓, seconds, per-row nll/tokens}.

    A cache POLICY@BUDGET (`anjax.eval.evaluate.parse_caches`) streams each row with that policy (settings
    from `policies`, else its defaults) at `row_budgets`, through `streamer` (default `scorer`), which
    evicts after every chunk of its `chunk_size`. `saved(cache, score)`: a cache's saved scores, or `score()`'s
    once saved (`resumable`)."""
    out = {}
    streamer = streamer or scorer

    def score(cache: str) -> dict:
        if "@" in cache:
            kind, budget = cache.split("@", 1)
            budgets = row_budgets(rows, parse_budget(budget), scorer.model.anchor_ids, scorer.model.cfg.anchor_window)
            return streamer.sequence_nll(rows, policy_of(policies, kind), scored, budgets)
        if cache == SEPLLM:
            return sepllm_scorer(scorer, sepllm_of(policies)).sequence_nll(rows, "anchor", scored)
        return scorer.sequence_nll(rows, cache, scored)

    for cache in caches:
        res = score(cache) if saved is None else saved(cache, functools.partial(score, cache))
        n = sum(res["tokens"])
        nll = sum(res["nll"]) / n
        full = sum(len(r) - 1 for r in rows)
        keep = [t > 0 for t in res["tokens"]]  # a row with no scored token has no weight
        ci = stats.ratio_of_sums_ci(np.compress(keep, res["nll"]), np.compress(keep, res["tokens"]), samples, seed)
        out[cache] = {
            "ppl": math.exp(nll),
            "ppl_ci": [math.exp(ci.low), math.exp(ci.high)],
            "nll_per_token": nll,
            "tokens": n,
            "rows": len(rows),
            "cache_slots": sum(res["held_slots"]),
            "full_cache_slots": full,
            "c_reduction": 1 - sum(res["held_slots"]) / full,
            "seconds": res["seconds"],
            "nll_per_row": res["nll"],
            "tokens_per_row": res["tokens"],
        }
    return out


def ratios(results: dict[str, dict], samples: int = stats.SAMPLES, seed: int = stats.SEED) -> dict[str, dict]:
    """{"anchor / full": ppl ratio, its paired interval over rows, tokens} for every cache besides full."""
    if "full" not in results:
        return {}
    full = results["full"]
    out = {}
    for cache, res in results.items():
        if cache == "full":
            continue
        if res["tokens_per_row"] != full["tokens_per_row"]:
            raise ValueError(f"{cache} and full scored different tokens: no paired ratio")
        keep = [t > 0 for t in full["tokens_per_row"]]
        delta_R = np.asarray(res["nll_per_row"]) - np.asarray(full["nll_per_row"])
        ci = stats.ratio_of_sums_ci(delta_R[keep], np.compress(keep, full["tokens_per_row"]), samples, seed)
        out[f"{cache} / full"] = {
            "ppl_ratio": math.exp(ci.estimate),
            "ppl_ratio_ci": [math.exp(ci.low), math.exp(ci.high)],
            "nll_gap_per_token": ci.estimate,
            "tokens": full["tokens"],
        }
    return out


def markdown(report: dict) -> str:
    b = report["bootstrap"]
    lines = [
        f"Perplexity, {report['text']} in rows of {report['seq_len']} tokens "
        f"({report['passages']} passages, anchors: {report['anchor_mode']}"
        + (f", <AC> every {report['ac_every']} tokens" if report["ac_every"] else "")
        + f"); {100 * b['level']:g}% intervals: bootstrap over rows ({b['samples']} resamples, seed {b['seed']})"
        + (
            f"; policies evict after every chunk of {report.get('policy_chunk', report['chunk_size'])} tokens"
            + "".join(f", {k} {_settings(p)}" for k, p in report["policies"].items())
            if report.get("policies")
            else ""
        ),
        "",
        "| model | cache | ppl | ppl / full ppl | tokens | C↓ | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for cache, r in report["results"].items():
        ratio = report["ratios"].get(f"{cache} / full")
        ratio = (
            f"{ratio['ppl_ratio']:.3f} [{ratio['ppl_ratio_ci'][0]:.3f}, {ratio['ppl_ratio_ci'][1]:.3f}]"
            if ratio
            else "1"
            if cache == "full"
            else "–"
        )
        lines.append(
            f"| {report['model']} | {cache} | {r['ppl']:.2f} [{r['ppl_ci'][0]:.2f}, {r['ppl_ci'][1]:.2f}] | "
            f"{ratio} | {r['tokens']} | {100 * r['c_reduction']:.1f}% | {r['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _settings(policy: dict) -> str:
    """The settings that matter for a policy kind (as `anjax.inference.policies.Policy` fields) or for
    training-free SepLLM (`SepLLM`, which has no kind)."""
    if "kind" not in policy:
        return f"(window {policy['window']}, sink {policy['sink']}, separators {' '.join(policy['separators'])})"
    keys = {"window": ("sink",), "snapkv": ("obs", "kernel"), "h2o": ()}[policy["kind"]]
    return "(" + ", ".join(f"{k} {policy[k]}" for k in keys) + ")" if keys else "(recent half + heavy half)"


def resumable(store_dir: Path, model: ScoringModel, rows, scored, settings: dict) -> Callable:
    """`perplexity`'s `saved`: each cache's scores saved in STORE_DIR/<cache>.json (`anjax.eval.resume.TaskStore`)
    with what they depend on (the weights and scheme, the rows as scored, `settings`: sizes and policies), so a
    rerun with the same arguments scores only the caches it lacks; a saved cache of other settings is an error."""
    store = resume.TaskStore(store_dir)
    digest = hashlib.sha256(json.dumps([rows, scored]).encode()).hexdigest()
    base = {**resume.model_fingerprint(model), **settings, "rows": len(rows), "rows_sha256": digest}

    def saved(cache: str, score: Callable[[], dict]) -> dict:
        fingerprint = json.loads(json.dumps({**base, "cache": cache}))
        if cache in store.check({cache: fingerprint}):
            print(f"{cache}: saved in {store.root}", flush=True)
            return store.load(cache)["result"]  # pyright: ignore[reportOptionalSubscript]  # check found it
        res = score()
        store.save(cache, fingerprint, res)
        return res

    return saved


def report(
    args,
    texts: Sequence[str],
    caches: Sequence[str],
    model: ScoringModel,
    policies: dict[str, Policy | SepLLM] | None = None,
    store_dir: Path | None = None,
) -> dict:
    """The perplexity report of `texts` for evaluate's arguments (`seq_len`, `ac_every`, batch, bootstrap);
    `policies`: the settings of the policies in `caches`; with `store_dir`, resumable cache by cache."""
    scorer = Scorer(model, batch_size=args.batch_size, chunk_size=args.chunk_size)
    streamer = Scorer(model, batch_size=args.batch_size, chunk_size=args.policy_chunk)
    rows, scored = text_rows(model, texts, args.seq_len, args.ac_every)
    t0 = time.perf_counter()
    kw = dict(samples=args.bootstrap_samples, seed=args.bootstrap_seed)
    settings = dict(batch_size=args.batch_size, chunk_size=args.chunk_size, policy_chunk=args.policy_chunk)
    settings["policies"] = {kind: dataclasses.asdict(p) for kind, p in sorted((policies or {}).items())}
    saved = None if store_dir is None else resumable(store_dir, model, rows, scored, settings)
    results = perplexity(scorer, rows, scored, caches, **kw, policies=policies, streamer=streamer, saved=saved)
    out = {
        "model": model.name,
        "anchor_mode": model.anchor_mode,
        "ac_every": args.ac_every,
        "seq_len": args.seq_len,
        "text": SOURCES.get(args.ppl_data, args.ppl_data),
        "passages": len(texts),
        "caches": list(caches),
        "chunk_size": args.chunk_size,
        "policy_chunk": args.policy_chunk,
        "policies": {kind: dataclasses.asdict(p) for kind, p in (policies or {}).items()},
        "results": results,
        "ratios": ratios(results, **kw),
        "bootstrap": {**kw, "level": stats.LEVEL, "unit": "row"},
    }
    out.update(wall_seconds=time.perf_counter() - t0, compile_seconds=scorer.compile_seconds + streamer.compile_seconds)
    return out
