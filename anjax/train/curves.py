"""A training run's held-out loss curve, full vs anchor, and how many tokens its trend needs
(`python -m anjax.report curve`).

The validation rows train.py writes to RUN/metrics.jsonl (`val_loss_full`, `val_loss_anchor`). The gap
g = anchor − full (nats/token; anchor perplexity / full perplexity = e^g) is fitted as a power law in the
tokens trained, log g = log a − b log tokens, by least squares over the evaluations from a first step on and
over the last few (a flattening trend shows as a smaller b there); each fit is extrapolated to a target
ratio (1.10: g = ln 1.10 ≈ 0.095). A cosine schedule decays the learning rate towards the end, so the tail
fit reads "this recipe, continued", not a law of the model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def validation_rows(metrics_path: Path, tokens_per_step: int) -> list[dict]:
    """One row per validation in `metrics_path` (the last one per step): step, tokens, losses, gap, train_s."""
    rows: dict[int, dict] = {}
    for n, line in enumerate(metrics_path.read_text().splitlines(), 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{metrics_path}:{n}: not JSON ({e.msg})") from None
        if "val_loss_full" in rec and "val_loss_anchor" in rec:
            full, anchor = float(rec["val_loss_full"]), float(rec["val_loss_anchor"])
            rows[int(rec["step"])] = dict(
                step=int(rec["step"]),
                tokens=int(rec["step"]) * tokens_per_step,
                full=full,
                anchor=anchor,
                gap=anchor - full,
                ppl_ratio=math.exp(anchor - full),
                train_s=rec.get("train_s"),
            )
    if not rows:
        raise ValueError(f"{metrics_path} has no validation rows (val_loss_full / val_loss_anchor)")
    return [rows[s] for s in sorted(rows)]


def power_fit(tokens: list[float], gaps: list[float]) -> tuple[float, float]:
    """(a, b) of gap ≈ a · tokens^−b, least squares in log-log space; needs >= 2 points with tokens, gap > 0."""
    pts = [(t, g) for t, g in zip(tokens, gaps) if t > 0 and g > 0]
    if len(pts) < 2:
        raise ValueError("a trend needs at least two evaluations after step 0 with a positive gap")
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    slope, intercept = np.polyfit(x, y, 1)
    return float(math.exp(intercept)), float(-slope)


def tokens_needed(a: float, b: float, gap: float) -> float | None:
    """Tokens at which a · tokens^−b reaches `gap`; None if the trend does not fall (b <= 0)."""
    return (a / gap) ** (1 / b) if b > 0 else None


def report(rows: list[dict], from_step: int, tail: int, target: float, run: str) -> dict:
    goal = math.log(target)
    fits = {}
    for name, sel in (
        (f"steps >= {from_step}", [r for r in rows if r["step"] >= from_step]),
        (f"last {tail} evaluations", [r for r in rows if r["step"] > 0][-tail:]),
    ):
        a, b = power_fit([r["tokens"] for r in sel], [r["gap"] for r in sel])
        need = tokens_needed(a, b, goal)
        fits[name] = dict(a=a, b=b, steps=[r["step"] for r in sel], tokens_needed=need)
    return dict(run=run, target_ratio=target, target_gap=goal, rows=rows, fits=fits)


def _tokens(x: float | None) -> str:
    if x is None:
        return "never (the gap does not fall)"
    for unit, scale in (("T", 1e12), ("B", 1e9)):
        if x >= scale:
            return f"{x / scale:,.1f}{unit}"
    return f"{x / 1e6:.1f}M"


def markdown(rep: dict) -> str:
    lines = [
        f"Held-out loss of {rep['run']} (nats/token); gap = anchor − full, ratio = anchor ppl / full ppl",
        "",
        "| step | tokens | full | anchor | gap | ppl ratio | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rep["rows"]:
        train_s = "–" if r["train_s"] is None else f"{r['train_s']:.0f}"
        lines.append(
            f"| {r['step']} | {r['tokens']:,} | {r['full']:.4f} | {r['anchor']:.4f} | {r['gap']:.3f} "
            f"| {r['ppl_ratio']:.2f} | {train_s} |"
        )
    lines += [
        "",
        f"Power-law trend of the gap, extrapolated to ratio {rep['target_ratio']:.2f} (gap {rep['target_gap']:.3f}):",
        "",
        "| fit over | gap ≈ a · tokens^−b | tokens needed |",
        "|---|---|---|",
    ]
    for name, f in rep["fits"].items():
        lines.append(f"| {name} | {f['a']:.3g} · tokens^−{f['b']:.3f} | {_tokens(f['tokens_needed'])} |")
    return "\n".join(lines)


def plot(rep: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rep["rows"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    tok = [r["tokens"] / 1e6 for r in rows]
    ax1.plot(tok, [r["full"] for r in rows], "o-", label="full attention")
    ax1.plot(tok, [r["anchor"] for r in rows], "s-", label="anchor mask")
    ax1.set_xlabel("tokens trained (M)")
    ax1.set_ylabel("held-out loss (nats/token)")
    ax1.grid(alpha=0.3)
    ax1.legend()
    pts = [r for r in rows if r["tokens"] > 0]
    ax2.loglog([r["tokens"] for r in pts], [r["gap"] for r in pts], "ko", label="anchor − full")
    ends = [r["tokens"] for r in pts] + [f["tokens_needed"] or 0 for f in rep["fits"].values()]
    xs = np.geomspace(pts[0]["tokens"], max(ends), 50)
    for i, (name, f) in enumerate(rep["fits"].items()):
        ax2.loglog(xs, f["a"] * xs ** -f["b"], "--", color=f"C{i}", label=f"fit {name}")
    ax2.axhline(rep["target_gap"], color="gray", ls=":", label=f"target (ratio {rep['target_ratio']:.2f})")
    ax2.set_xlabel("tokens trained")
    ax2.set_ylabel("gap (nats/token)")
    ax2.grid(alpha=0.3, which="both")
    ax2.legend(fontsize=8)
    fig.suptitle(rep["run"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
