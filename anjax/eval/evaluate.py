"""The paper's evaluation: Acc, C↓ and T↑ on its eight QA benchmarks (Table 1), and perplexity.

The library; the command (`python -m anjax.evaluate`) is `anjax.cli.evaluate`:

    python -m anjax.evaluate --tasks arc_easy,piqa --shots 0 --cache full,anchor --anchor-mode ep \\
        --limit 50 --out-dir benchmarks/results --name eval_smollm2
    python -m anjax.evaluate --perplexity --cache full,anchor --anchor-mode ac --ac-every 32 --limit 200

Multiple choice is scored as lm-evaluation-harness does it (prompts, few-shot
sampling, acc / acc_norm: `anjax.eval.tasks`; tokenization: `anjax.inference.scoring`), through
the inference engine: each item's shared context is prefilled once with the
chosen cache, then all its choices are scored against that cache in one batch.
AC mode anchors the context like training data (`<AC>` after every sentence and
after every demonstration).

Per task and cache mode:
- Acc: `acc` (and `acc_norm` where the harness reports it), on the documents scored.
- C↓ = 1 − Σ slots the cache holds when the choices are scored / Σ slots a full
  cache holds then (the context tokens), over the task's items (0 for the full cache).
- T↑ (vs full) = time with the full cache / time with this cache;
  T↑ (vs recompute) = time of the paper's no-cache baseline (one full forward of
  context + continuation per choice, full attention) / time with this cache.
  All paths run in the same process on the same batches (interleaved batch by
  batch), compilation excluded; device time only (tokenization is shared).
Intervals (`anjax.eval.intervals`): a 95% bootstrap interval over documents (seeded)
for every accuracy and for the average over tasks, and the paired difference
anchor − full on the same documents with its own interval.

Your own multiple-choice data: `--tasks my_task.jsonl` (one JSON object per line:
`context`, `choices`, `gold`, optional `id`; see `anjax.eval.tasks`), scored like the
built-in tasks.

Outputs: the tables printed, `OUT_DIR/NAME.md`, `NAME.json` (every raw number incl.
per-item log-likelihoods and per-document correctness) and `NAME.png` (accuracy
with error bars); `--json OUT` writes the JSON elsewhere too. Each finished task is kept in
`OUT_DIR/NAME.tasks/` with a fingerprint of what it depends on (`anjax.eval.resume`): rerun with the
same arguments, a killed evaluation resumes; with other arguments it stops (new --name, or delete it).

Perplexity (`--perplexity`): held-out passages (`--ppl-data`: LAMBADA test passages
by default, the embedded corpus' validation split, or your text files)
concatenated (a blank line between passages) and cut into rows of `--seq-len`
tokens, scored through chunked prefill with each cache (`anjax.eval.perplexity`):
each cache's perplexity, anchor / full and the tokens scored, with intervals.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from anjax.eval import tasks
from anjax.inference.policies import POLICIES, Policy, SepLLM, fraction_slots
from anjax.inference.scoring import CACHE_KINDS, Scorer, ScoreRequest, anchor_kept, sepllm_model
from anjax.io import outputs

DEFAULT_TASKS = ("obqa", "winogrande", "arc_easy", "arc_challenge", "piqa", "hellaswag", "sciq", "boolq")
RECOMPUTE = "recompute"
MATCH_ANCHOR = "match-anchor"
SEPLLM = "sepllm"  # training-free SepLLM: the anchor cache of `anjax.inference.scoring.sepllm_model`


def parse_caches(text: str, budgets: str | None = None) -> list[str]:
    """Cache names: full, anchor, and POLICY@BUDGET for each policy (`anjax.inference.policies`) and each
    budget of the comma list `budgets` (match-anchor or a fraction of the prompt in (0, 1])."""
    caches = [c.strip() for c in text.split(",") if c.strip()]
    known = CACHE_KINDS + (SEPLLM,) + POLICIES
    if not caches or any(c not in known for c in caches):
        raise ValueError(f"--cache must be a comma list of {', '.join(known)}; got {text!r}")
    caches = list(dict.fromkeys(caches))
    if not any(c in POLICIES for c in caches):
        if budgets is not None:
            raise ValueError(f"--budget applies to the policies {', '.join(POLICIES)}; --cache has none")
        return caches
    if budgets is None:
        raise ValueError(f"--cache {text} needs --budget (match-anchor or fractions in (0, 1], comma separated)")
    sizes = [parse_budget(b.strip()) for b in budgets.split(",") if b.strip()]
    if not sizes:
        raise ValueError(f"--budget is empty: {budgets!r}")
    return [c for c in caches if c not in POLICIES] + [
        f"{c}@{b}" for b in dict.fromkeys(sizes) for c in caches if c in POLICIES
    ]


def parse_budget(text: str) -> str | float:
    """`match-anchor`, or a fraction of each prompt's tokens in (0, 1]."""
    if text == MATCH_ANCHOR:
        return text
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise ValueError(f"--budget must be {MATCH_ANCHOR} or a fraction in (0, 1], got {text!r}")
    return value


def row_budgets(
    rows: Sequence[Sequence[int]], budget: str | float, anchor_ids: Sequence[int], window: int = 0
) -> list[int]:
    """Per id list (all but its last id are fed), the slots a policy keeps: a fraction F of the fed
    tokens, max(1, ⌊F × (len(row) − 1)⌋), or with `match-anchor` exactly what the anchor cache (with the
    scheme's `window`) holds after them (`anjax.inference.scoring.anchor_kept`)."""
    if budget == MATCH_ANCHOR:
        return [anchor_kept(r[:-1], anchor_ids, window) for r in rows]
    if isinstance(budget, str):
        raise ValueError(f"a budget is {MATCH_ANCHOR} or a fraction, got {budget!r}")
    return [fraction_slots(budget, len(r) - 1) for r in rows]


def item_budgets(
    requests: Sequence[ScoreRequest], budget: str | float, anchor_ids: Sequence[int], window: int = 0
) -> list[int]:
    """Per item, `row_budgets` of its prefix (the prefilled context)."""
    return row_budgets([r.prefix for r in requests], budget, anchor_ids, window)


def sepllm_scorer(scorer: Scorer, settings: SepLLM | None) -> Scorer:
    """A scorer of the same weights under SepLLM's scheme (`settings`, default `SepLLM()`), sharing `scorer`'s
    compile cache: its "anchor" cache is training-free SepLLM."""
    sub = Scorer(sepllm_model(scorer.model, settings or SepLLM()), scorer.batch_size, scorer.chunk_size)
    sub.runtime = scorer.runtime
    return sub


def policy_of(policies: dict[str, Policy | SepLLM] | None, kind: str) -> Policy:
    """The settings of policy `kind` in `policies` (`anjax.cli.evaluate.policy_settings`), else its defaults."""
    settings = (policies or {}).get(kind, Policy(kind))
    if not isinstance(settings, Policy):
        raise TypeError(f"the settings of policy {kind} are a {type(settings).__name__}, not a Policy")
    return settings


def sepllm_of(policies: dict[str, Policy | SepLLM] | None) -> SepLLM | None:
    """SepLLM's settings in `policies` (under `sepllm`), if any."""
    settings = (policies or {}).get(SEPLLM)
    if settings is not None and not isinstance(settings, SepLLM):
        raise TypeError(f"the settings of {SEPLLM} are a {type(settings).__name__}, not a SepLLM")
    return settings


def _path(name: str, requests, model, policies: dict[str, Policy | SepLLM]) -> tuple:
    """The scorer path of a cache name: (cache, False) or (Policy, per-item budgets)."""
    if "@" not in name:
        return (name, False)
    kind, budget = name.split("@", 1)
    return (
        policy_of(policies, kind),
        item_budgets(requests, parse_budget(budget), model.anchor_ids, model.cfg.anchor_window),
    )


def evaluate_task(
    scorer: Scorer,
    items: Sequence[tasks.MCItem],
    caches: Sequence[str],
    timing: bool = True,
    policies: dict[str, Policy | SepLLM] | None = None,
) -> dict[str, dict[str, Any]]:
    """Scores, C↓ and T↑ of one task's items for each cache in `caches` -> {cache: result}.

    Names POLICY@BUDGET (`parse_caches`) run that policy (settings from `policies`, else its defaults)
    at each item's budget (`item_budgets`); `sepllm` the anchor cache of `sepllm_scorer` (`policies["sepllm"]`,
    a `SepLLM`), on the same documents, after the other paths. With `timing`, the full-cache path (if not asked for) and
    the recompute path also run, on the same batches, to time T↑.
    """
    model = scorer.model
    requests = [model.encode_request(it.pairs()) for it in items]
    positions = model.cfg.max_position_embeddings
    for it, req in zip(items, requests):
        if (n := len(req.prefix) + max(len(t) + len(c) for t, c in zip(req.tails, req.continuations))) > positions:
            raise ValueError(
                f"{it.task} document {it.doc.index}: context and choice are {n} tokens, more than the model's "
                f"{positions} positions"
            )
    paths = {c: _path(c, requests, model, policies or {}) for c in caches if c != SEPLLM}  # name -> (cache, how)
    if timing:
        paths.setdefault("full", ("full", False))
        paths[RECOMPUTE] = ("full", True)
    results = dict(zip(paths, scorer.run_paths(requests, list(paths.values()))))
    if SEPLLM in caches:
        results[SEPLLM] = sepllm_scorer(scorer, sepllm_of(policies)).run(requests, "anchor")
    matched = [c for c in caches if c.endswith(f"@{MATCH_ANCHOR}")]
    if matched and "anchor" in results and results["anchor"].held_slots != results[matched[0]].held_slots:
        raise AssertionError("match-anchor budgets differ from the anchor cache's slots")  # `anchor_kept` is wrong
    full_slots = sum(results[caches[0]].prefix_slots)
    out = {}
    for cache in caches:
        res = results[cache]
        flat = [x for ll in res.loglik for x in ll]
        scores = tasks.score_items(lambda pairs, flat=flat: flat, items)
        row = {k: v for k, v in scores.items() if k not in ("task", "preds")}
        row.update(
            cache_slots=sum(res.held_slots),
            full_cache_slots=full_slots,
            c_reduction=1 - sum(res.held_slots) / max(full_slots, 1),
            seconds=res.seconds,
            tokens=res.tokens,
            preds=scores["preds"],
            loglik=res.loglik,
            doc_ids=[it.doc.fields.get("id", it.doc.index) for it in items],
        )
        if timing:
            row.update(
                t_vs_full=results["full"].seconds / res.seconds,
                t_vs_recompute=results[RECOMPUTE].seconds / res.seconds,
                full_seconds=results["full"].seconds,
                recompute_seconds=results[RECOMPUTE].seconds,
            )
            if cache == "full":
                row["recompute_max_abs_diff"] = max(
                    abs(a - b) for x, y in zip(res.loglik, results[RECOMPUTE].loglik) for a, b in zip(x, y)
                )
        out[cache] = row
    return out


# ----------------------------------------------------------------------------- report


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _times(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def markdown_table(report: dict) -> str:
    """Table 1 layout: rows model × cache, columns tasks + average; cells Acc / C↓ / T↑(full) / T↑(recompute)."""
    names = list(report["tasks"])
    head = "| model | cache | " + " | ".join(names) + " | avg |"
    lines = [
        f"Acc / C↓ / T↑ vs full cache / T↑ vs recompute — {report['shots']}-shot, "
        f"{report['limit'] or 'all'} docs per task, anchors: {report['anchor_mode']}",
        "",
        head,
        "|" + "---|" * (len(names) + 3),
    ]
    norm_lines = ["", "acc_norm (where the harness reports it)", "", head, "|" + "---|" * (len(names) + 3)]
    for cache in report["caches"]:
        rows = [report["tasks"][t][cache] for t in names]
        cells = [(r["acc"], r["c_reduction"], r.get("t_vs_full"), r.get("t_vs_recompute")) for r in rows]
        avg = tuple(_mean([c[i] for c in cells]) for i in range(4))
        fmt = lambda c: f"{_pct(c[0])} / {_pct(c[1])}% / {_times(c[2])} / {_times(c[3])}"
        label = f"| {report['model']} | {cache}{' (' + report['anchor_mode'] + ')' if cache == 'anchor' else ''} | "
        lines.append(label + " | ".join(map(fmt, cells + [avg])) + " |")
        norms = [r.get("acc_norm") for r in rows]
        norm_lines.append(label + " | ".join(map(_pct, norms + [_mean(norms)])) + " |")
    return "\n".join(lines + norm_lines) + "\n"


def plot(report: dict, path) -> None:
    """Panels: accuracy per task and on average (95% interval bars) for each cache; each cache − full
    (paired intervals); C↓ of each cache; T↑ of each cache."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, caches = list(report["tasks"]), report["caches"]
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.2))
    plot_accuracy(axes[0], report)
    plot_differences(axes[1], report)
    width = 0.8 / max(len(caches), 1)
    panels = (("c_reduction", "C↓ cache reduction (%)", 100), ("t_vs_recompute", "T↑ vs recompute (×)", 1))
    for ax, (key, title, scale) in zip(axes[2:], panels):
        for j, cache in enumerate(caches):
            ys = [(report["tasks"][t][cache].get(key) or 0) * scale for t in names]
            ax.bar([i + j * width for i in range(len(names))], ys, width, label=cache)
        if key == "t_vs_recompute":
            ys = [report["tasks"][t][caches[-1]].get("t_vs_full") or 0 for t in names]
            ax.plot(
                [i + (len(caches) - 1) * width for i in range(len(names))],
                ys,
                "k^",
                label=f"{caches[-1]}: T↑ vs full cache",
            )
        _axis(ax, names, width, len(caches), title)
    fig.suptitle(f"{report['model']}, {report['shots']}-shot, anchors {report['anchor_mode']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _axis(ax, labels: list[str], width: float, groups: int, title: str) -> None:
    ax.set_xticks([i + width * (groups - 1) / 2 for i in range(len(labels))], labels, rotation=45, ha="right")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def _bars(ax, cells: list[dict], offset: float, width: float, label: str) -> None:
    """Bars of cells' `acc` in percent with their `acc_ci` as error bars."""
    ys = [100 * c["acc"] for c in cells]
    err = [[100 * (c["acc"] - c["acc_ci"][0]) for c in cells], [100 * (c["acc_ci"][1] - c["acc"]) for c in cells]]
    ax.bar([i + offset for i in range(len(cells))], ys, width, yerr=err, capsize=2, label=label)


def plot_accuracy(ax, report: dict) -> None:
    """acc per task and on average for each cache, with 95% interval bars (`anjax.eval.intervals`)."""
    names, caches = list(report["tasks"]), report["caches"]
    width = 0.8 / len(caches)
    for j, cache in enumerate(caches):
        _bars(ax, [report["tasks"][t][cache] for t in names] + [report["average"][cache]], j * width, width, cache)
    _axis(ax, names + ["average"], width, len(caches), "accuracy (%), 95% intervals")


def plot_differences(ax, report: dict) -> None:
    """cache − full accuracy per task and on average, in points, with the paired 95% intervals."""
    names, diffs = list(report["tasks"]), report["differences"]
    width = 0.8 / max(len(diffs), 1)
    for j, (name, diff) in enumerate(diffs.items()):
        _bars(ax, [diff["tasks"][t] for t in names] + [diff["average"]], j * width, width, name)
    ax.axhline(0, color="k", lw=0.8)
    _axis(ax, names + ["average"], width, max(len(diffs), 1), "accuracy difference (points), paired 95% intervals")


def save(report: dict, text: str, out_dir: str | None, name: str, json_path: str | None, png: bool) -> None:
    """NAME.md, NAME.json (and NAME.png) in `out_dir`, and the JSON at `json_path`; each file written atomically."""
    if out_dir:
        outputs.write_report(out_dir, name, text, report, plot if png else None)
    if json_path:
        outputs.write_text(json_path, json.dumps(report, indent=1))
