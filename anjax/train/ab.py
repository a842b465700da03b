"""A/B of training recipes at equal wall-clock: each arm's held-out loss (anchor mask, full attention beside
it) against its training seconds, from the arms' run directories (`python -m anjax.report ab`; the arms are
run by benchmarks/ab_objectives.py).

The clock is train.py's `train_s` (time inside optimizer steps, validation excluded; arms side by side, so
a slower objective pays for its extra compute) or its `step` (arms one after another, where seconds depend on
what else ran then; fair when the arms cost the same per step). The arms compare at the common end of the
clock: each arm's last validation at or before the shortest arm's last.

The validation loss counts every target of the arm's own rows, `<AC>` tokens included, so arms with and
without `<AC>` (AC, EP/SepLLM) differ by what they predict, not only by how well. Beside it, each finished
arm's held-out perplexity on text tokens only (OUT/NAME.ppl.json: `python -m anjax.evaluate --perplexity` of
its last checkpoint, full and anchor cache, the same text for every arm; `ab_objectives.py --ppl`), with the
KV its anchor cache keeps; the winner (`winner`) is the arm with the lowest anchor-cache perplexity there.
"""

from __future__ import annotations

import json
from pathlib import Path

from anjax.io import outputs


def curves(out: Path, names: list[str]) -> dict[str, list[dict]]:
    """Per arm: its validation records (step, train_s, tokens, val_loss_full, val_loss_anchor)."""
    result = {}
    for name in names:
        path = out / name / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        result[name] = [r for r in records if "val_loss_anchor" in r]
    return result


CLOCKS = ("train_s", "step")


def text_perplexity(out: Path, name: str) -> dict | None:
    """The arm's held-out perplexity on text tokens (OUT/NAME.ppl.json, caches full and anchor) in `summarize`'s
    row fields, or None before it is measured."""
    path = out / f"{name}.ppl.json"
    if not path.is_file():
        return None
    rep = json.loads(path.read_text())
    full, anchor, ratio = rep["results"]["full"], rep["results"]["anchor"], rep["ratios"]["anchor / full"]
    return {
        "ppl_step": rep["provenance"]["models"]["model"]["training_step"],
        "ppl_full": full["ppl"],
        "ppl_anchor": anchor["ppl"],
        "ppl_anchor_ci": anchor["ppl_ci"],
        "ppl_ratio": ratio["ppl_ratio"],
        "ppl_ratio_ci": ratio["ppl_ratio_ci"],
        "kept": 1 - anchor["c_reduction"],
        "ppl_tokens": anchor["tokens"],
    }


def summarize(
    curves_by_arm: dict[str, list[dict]], clock: str = "train_s", ppl: dict[str, dict | None] | None = None
) -> list[dict]:
    """One row per arm at the common end of the clock (`train_s` or `step`): its last validation at or before
    the shortest arm's last, with its `text_perplexity` when `ppl` has it; ranked by the anchor-cache perplexity
    when every arm has one, else by the anchor-mask validation loss."""
    ends = [c[-1].get(clock, 0.0) for c in curves_by_arm.values() if c]
    common_end = min(ends) if ends else 0.0
    rows = []
    for name, c in curves_by_arm.items():
        upto = [r for r in c if r.get(clock, 0.0) <= common_end + 1e-9] or c[:1]
        if not upto:
            continue
        r, first = upto[-1], c[0]
        rows.append(
            {
                "arm": name,
                "step": r["step"],
                "train_s": round(r.get("train_s", 0.0), 1),
                "val_loss_full": r["val_loss_full"],
                "val_loss_anchor": r["val_loss_anchor"],
                "gap": r["val_loss_anchor"] - r["val_loss_full"],
                "full_change": r["val_loss_full"] - first["val_loss_full"],
                "last_step": c[-1]["step"],
                "last_val_loss_anchor": c[-1]["val_loss_anchor"],
                **((ppl or {}).get(name) or {}),
            }
        )
    key = "ppl_anchor" if rows and all("ppl_anchor" in r for r in rows) else "val_loss_anchor"
    return sorted(rows, key=lambda row: row[key])


def winner(rows: list[dict], names: list[str]) -> str:
    """The arm of `names` with the lowest held-out anchor-cache perplexity on text (`summarize`'s rows), once
    every arm has a row at the same last step and its perplexity measured there; ValueError naming what is
    missing."""
    last = {r["arm"]: r["last_step"] for r in rows}
    end = max(last.values(), default=0)
    short = [f"{n} (step {last[n]})" if n in last else f"{n} (not started)" for n in names if last.get(n) != end]
    if short or not rows:
        raise ValueError(f"the A/B is not complete: {', '.join(short) or 'no arm'} short of step {end}")
    unmeasured = [r["arm"] for r in rows if r["arm"] in names and r.get("ppl_step") != end]
    if unmeasured:
        raise ValueError(f"no held-out perplexity at step {end} (OUT/NAME.ppl.json) of {', '.join(unmeasured)}")
    return min((r for r in rows if r["arm"] in names), key=lambda r: r["ppl_anchor"])["arm"]


def markdown(rows: list[dict]) -> str:
    """The validation losses per arm, and where measured the held-out text perplexity with its KV kept."""
    ppl = any("ppl_anchor" in r for r in rows)
    head = "| arm | step | train s | val loss full | val loss anchor | anchor − full | full vs step 0 |"
    head += " text ppl full | text ppl anchor | anchor / full | KV kept |" if ppl else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = (
            f"| {r['arm']} | {r['step']} | {r['train_s']:.0f} | {r['val_loss_full']:.4f} | "
            f"{r['val_loss_anchor']:.4f} | {r['gap']:+.4f} | {r['full_change']:+.4f} |"
        )
        if "ppl_anchor" in r:
            lo, hi = r["ppl_anchor_ci"]
            line += (
                f" {r['ppl_full']:.2f} | {r['ppl_anchor']:.2f} [{lo:.2f}, {hi:.2f}] | {r['ppl_ratio']:.3f} "
                f"[{r['ppl_ratio_ci'][0]:.3f}, {r['ppl_ratio_ci'][1]:.3f}] | {100 * r['kept']:.1f}% |"
            )
        elif ppl:
            line += " – | – | – | – |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def plot(curves_by_arm: dict[str, list[dict]], path, clock: str = "train_s") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, c in curves_by_arm.items():
        if not c:
            continue
        t = [r.get(clock, 0.0) for r in c]
        (line,) = ax.plot(t, [r["val_loss_anchor"] for r in c], marker="o", label=f"{name} (anchor mask)")
        ax.plot(t, [r["val_loss_full"] for r in c], ls="--", color=line.get_color(), label=f"{name} (full)")
    ax.set_xlabel(
        "training seconds (validation excluded; arms side by side)" if clock == "train_s" else "optimizer step"
    )
    ax.set_ylabel("held-out loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, names: list[str], clock: str = "train_s", **meta) -> list[dict]:
    """OUT/ab.{md,json,png} of the arms `names` (run directories below `out`) at the common end of `clock`;
    `meta` (the config, the arms' overrides, the seconds, the provenance) goes into the JSON. Returns the rows."""
    by_arm = curves(out, names)
    rows = summarize(by_arm, clock, {name: text_perplexity(out, name) for name in names})
    table = markdown(rows)
    print(table)
    data = {**meta, "clock": clock, "rows": rows, "curves": by_arm}
    outputs.write_report(out, "ab", table, data, lambda d, file: plot(d["curves"], file, clock))
    print(f"[ab] wrote {out / 'ab.md'}, {out / 'ab.json'}, {out / 'ab.png'}")
    return rows
