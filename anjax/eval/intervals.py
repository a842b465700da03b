"""95% intervals of an `anjax.eval.evaluate` report: per task, the average over tasks, and cache − full.

`add_accuracy_intervals(report)` reads the per-document correctness each task row
keeps (`acc_per_doc`, `acc_norm_per_doc`: 0/1 per document, in order) and adds

    report["tasks"][task][cache]["acc_ci"]          [low, high] of that accuracy
    report["average"][cache]                        {"acc", "acc_ci", "tasks", "docs", ...}: the unweighted
                                                    mean over the tasks reporting the metric; its
                                                    resamples draw documents within each task
    report["differences"]["anchor - full"]          {"tasks": {task: {"acc", "acc_ci"}}, "average": {...}}:
                                                    paired on the same documents (one resample for both)
    report["bootstrap"]                             {"samples", "seed", "level", "unit": "document"}

(the same for `acc_norm` where the harness reports it). `markdown(report)` is
the table of those numbers, in percent. Statistics: `anjax.eval.stats`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from anjax.eval import stats

METRICS = ("acc", "acc_norm")


def difference_name(cache: str, base: str = "full") -> str:
    return f"{cache} - {base}"


def add_accuracy_intervals(
    report: dict, samples: int = stats.SAMPLES, seed: int = stats.SEED, level: float = stats.LEVEL
) -> dict:
    """Add the intervals described in the module docstring to `report` (in place; returned)."""
    names, caches = list(report["tasks"]), list(report["caches"])
    report["bootstrap"] = {"samples": samples, "seed": seed, "level": level, "unit": "document"}
    report["average"] = {c: {} for c in caches}
    others = [c for c in caches if c != "full"] if "full" in caches else []
    report["differences"] = {difference_name(c): {"tasks": {t: {} for t in names}, "average": {}} for c in others}
    for metric in METRICS:
        have = [t for t in names if f"{metric}_per_doc" in report["tasks"][t][caches[0]]]
        if not have:
            continue
        per_doc = {c: [np.asarray(report["tasks"][t][c][f"{metric}_per_doc"], float) for t in have] for c in caches}
        for c in caches:
            for t, x in zip(have, per_doc[c]):
                report["tasks"][t][c][f"{metric}_ci"] = stats.mean_ci(x, samples, seed, level).as_list()
            avg = stats.task_average_ci(per_doc[c], samples, seed, level)
            report["average"][c].update(
                {
                    metric: avg.estimate,
                    f"{metric}_ci": avg.as_list(),
                    f"{metric}_tasks": have,
                    f"{metric}_docs": sum(map(len, per_doc[c])),
                }
            )
        for c in others:
            diff = report["differences"][difference_name(c)]
            deltas = [a - b for a, b in zip(per_doc[c], per_doc["full"])]
            for t, a, b in zip(have, per_doc[c], per_doc["full"]):
                d = stats.paired_difference_ci(a, b, samples, seed, level)
                diff["tasks"][t].update({metric: d.estimate, f"{metric}_ci": d.as_list()})
            d = stats.task_average_ci(deltas, samples, seed, level)
            diff["average"].update({metric: d.estimate, f"{metric}_ci": d.as_list(), f"{metric}_tasks": have})
    return report


def cell(value: float, ci: Sequence[float], signed: bool = False) -> str:
    f = (lambda x: f"{100 * x:+.1f}".replace("-", "−")) if signed else (lambda x: f"{100 * x:.1f}")
    return f"{f(value)} [{f(ci[0])}, {f(ci[1])}]"


def markdown(report: dict) -> str:
    """One table per metric: rows tasks + average, columns docs, each cache and each cache − full."""
    b = report["bootstrap"]
    caches, diffs = list(report["caches"]), list(report["differences"])
    label = {c: f"{c} ({report['anchor_mode']})" if c == "anchor" else c for c in caches}
    out = []
    for metric in METRICS:
        avg = report["average"][caches[0]]
        if metric not in avg:
            continue
        have = avg[f"{metric}_tasks"]
        out += [
            f"{metric} (%) with {100 * b['level']:g}% intervals: bootstrap over documents ({b['samples']} "
            f"resamples, seed {b['seed']}); the average resamples documents within each task; "
            + ("differences are paired (same documents)" if diffs else "no differences (no full cache)"),
            "",
            "| task | docs | " + " | ".join([label[c] for c in caches] + [d.replace("-", "−") for d in diffs]) + " |",
            "|" + "---|" * (2 + len(caches) + len(diffs)),
        ]
        for t in have:
            rows = report["tasks"][t]
            cells = [cell(rows[c][metric], rows[c][f"{metric}_ci"]) for c in caches]
            cells += [
                cell(
                    report["differences"][d]["tasks"][t][metric],
                    report["differences"][d]["tasks"][t][f"{metric}_ci"],
                    signed=True,
                )
                for d in diffs
            ]
            out.append(f"| {t} | {rows[caches[0]]['n']} | " + " | ".join(cells) + " |")
        cells = [cell(report["average"][c][metric], report["average"][c][f"{metric}_ci"]) for c in caches]
        cells += [
            cell(
                report["differences"][d]["average"][metric],
                report["differences"][d]["average"][f"{metric}_ci"],
                signed=True,
            )
            for d in diffs
        ]
        out += [
            f"| average ({len(have)} task{'s' * (len(have) != 1)}) | {avg[f'{metric}_docs']} | "
            + " | ".join(cells)
            + " |",
            "",
        ]
    return "\n".join(out)
