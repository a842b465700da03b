"""Bootstrap intervals (anjax/eval/stats.py) against closed forms, seeds and simulated coverage."""

import math

import numpy as np
import pytest

from anjax.eval import stats

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_mean_ci_matches_wilson_on_large_n():
    rng = np.random.default_rng(1)
    x = (rng.random(5000) < 0.3).astype(float)
    ci = stats.mean_ci(x, samples=20_000, seed=3)
    lo, hi = wilson(int(x.sum()), x.size)
    assert ci.estimate == pytest.approx(x.mean())
    assert ci.low == pytest.approx(lo, abs=0.002) and ci.high == pytest.approx(hi, abs=0.002)
    assert ci.low < ci.estimate < ci.high


def test_same_seed_same_interval_other_seed_other_interval():
    x = (np.random.default_rng(0).random(200) < 0.6).astype(float)
    assert stats.mean_ci(x, seed=7) == stats.mean_ci(x, seed=7)
    assert stats.task_average_ci([x, x[:50]], seed=7) == stats.task_average_ci([x, x[:50]], seed=7)
    y = np.random.default_rng(0).normal(size=200)  # continuous: quantiles do not sit on a 1/n grid
    assert stats.mean_ci(y, seed=7) != stats.mean_ci(y, seed=8)


def test_chunk_size_only_changes_the_draws(monkeypatch):
    """Indices are drawn chunk by chunk (bounded memory): one-replicate chunks give another
    draw of the same interval."""
    x = np.arange(300.0)
    whole = stats.mean_ci(x, samples=4000)
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 1)
    small = stats.mean_ci(x, samples=4000)
    assert small.estimate == whole.estimate
    assert small.low == pytest.approx(whole.low, abs=2.0) and small.high == pytest.approx(whole.high, abs=2.0)


def test_coverage_is_near_nominal():
    """Over 400 simulated tasks of 200 Bernoulli(0.7) documents, ~95% of intervals hold 0.7."""
    rng = np.random.default_rng(11)
    hits = 0
    for i in range(400):
        ci = stats.mean_ci((rng.random(200) < 0.7).astype(float), samples=2000, seed=i)
        hits += ci.low <= 0.7 <= ci.high
    assert 0.91 <= hits / 400 <= 0.98


def test_paired_difference_narrower_than_unpaired_on_correlated_data():
    """Anchor agrees with full on 90% of documents: the paired interval is far narrower than the
    unpaired normal interval sqrt(var_a/n + var_b/n), and matches the closed form of mean(a − b)."""
    rng = np.random.default_rng(5)
    full = (rng.random(400) < 0.6).astype(float)
    flip = rng.random(400) < 0.1
    anchor = np.where(flip, 1 - full, full)
    paired = stats.paired_difference_ci(anchor, full, seed=2)
    d = anchor - full
    assert paired.estimate == pytest.approx(anchor.mean() - full.mean())
    se_paired = d.std(ddof=1) / math.sqrt(d.size)
    se_unpaired = math.sqrt(anchor.var(ddof=1) / 400 + full.var(ddof=1) / 400)
    width = paired.high - paired.low
    assert width == pytest.approx(2 * Z95 * se_paired, rel=0.1)
    assert width < 0.5 * 2 * Z95 * se_unpaired


def test_task_average_matches_closed_form_and_one_task():
    rng = np.random.default_rng(9)
    tasks = [(rng.random(n) < p).astype(float) for n, p in ((300, 0.3), (800, 0.5), (500, 0.8))]
    avg = stats.task_average_ci(tasks, samples=20_000, seed=4)
    assert avg.estimate == pytest.approx(np.mean([t.mean() for t in tasks]))
    se = math.sqrt(sum(t.var(ddof=0) / t.size for t in tasks)) / len(tasks)
    assert avg.high - avg.low == pytest.approx(2 * Z95 * se, rel=0.05)
    assert stats.task_average_ci(tasks[:1], seed=4) == stats.mean_ci(tasks[0], seed=4)


def test_ratio_of_sums_ci():
    """NLL per token over rows of unequal length: the estimate is Σ nll / Σ tokens (not the mean of
    per-row ratios), and the interval holds it; with equal rows it is the mean's interval."""
    nll, tokens = np.array([10.0, 40.0, 5.0, 30.0]), np.array([5.0, 10.0, 5.0, 10.0])
    ci = stats.ratio_of_sums_ci(nll, tokens)
    assert ci.estimate == pytest.approx(85 / 30) and ci.low <= ci.estimate <= ci.high
    x = np.random.default_rng(0).normal(size=50)
    same, mean = stats.ratio_of_sums_ci(x, np.ones(50), seed=1), stats.mean_ci(x, seed=1)
    assert (same.low, same.high) == pytest.approx((mean.low, mean.high), abs=1e-12)


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda: stats.mean_ci([]), "non-empty"),
        (lambda: stats.mean_ci([[1.0, 0.0]]), "1-d"),
        (lambda: stats.mean_ci([1.0, float("nan")]), "non-finite"),
        (lambda: stats.paired_difference_ci([1, 0], [1, 0, 1]), "differ in length"),
        (lambda: stats.task_average_ci([]), "at least one task"),
        (lambda: stats.ratio_of_sums_ci([1.0], [0.0]), "den must be > 0"),
        (lambda: stats.mean_ci([1.0], samples=0), "samples"),
        (lambda: stats.mean_ci([1.0], level=1.0), "level"),
    ],
)
def test_bad_input(call, fragment):
    with pytest.raises(ValueError, match=fragment):
        call()


# ----------------------------------------------------------------------------- a report's intervals


def test_report_intervals_pair_anchor_with_full():
    """anjax.eval.intervals on a hand-made report: per-task intervals, the task average and the paired
    difference are the `stats` calls on the stored per-document results; acc_norm only where reported."""
    from anjax.eval import intervals

    full = {"a": [1, 0, 1, 1, 0, 1], "b": [0, 1, 1, 0]}
    anchor = {"a": [1, 0, 0, 1, 0, 1], "b": [0, 0, 1, 0]}
    row = lambda x, norm: {
        "n": len(x),
        "acc": np.mean(x),
        "acc_per_doc": x,
        **({"acc_norm": np.mean(x), "acc_norm_per_doc": x} if norm else {}),
    }
    report = {
        "anchor_mode": "ep",
        "caches": ["full", "anchor"],
        "tasks": {t: {"full": row(full[t], t == "a"), "anchor": row(anchor[t], t == "a")} for t in full},
    }
    intervals.add_accuracy_intervals(report, samples=500, seed=3)
    kw = dict(samples=500, seed=3)
    assert report["tasks"]["a"]["anchor"]["acc_ci"] == stats.mean_ci(anchor["a"], **kw).as_list()
    avg = stats.task_average_ci([full["a"], full["b"]], **kw)
    assert report["average"]["full"]["acc"] == avg.estimate and report["average"]["full"]["acc_ci"] == avg.as_list()
    diff = report["differences"]["anchor - full"]
    assert diff["tasks"]["b"]["acc"] == pytest.approx(-0.25)
    assert diff["tasks"]["b"]["acc_ci"] == stats.paired_difference_ci(anchor["b"], full["b"], **kw).as_list()
    deltas = [np.subtract(anchor[t], full[t]) for t in full]
    assert diff["average"]["acc_ci"] == stats.task_average_ci(deltas, **kw).as_list()
    assert report["average"]["anchor"]["acc_norm_tasks"] == ["a"] and "acc_norm_ci" not in report["tasks"]["b"]["full"]
    assert report["bootstrap"] == {"samples": 500, "seed": 3, "level": 0.95, "unit": "document"}
    table = intervals.markdown(report)
    assert "| task | docs | full | anchor (ep) | anchor − full |" in table
    assert "| b | 4 | 50.0 [" in table and "| average (2 tasks) | 10 |" in table and "| average (1 task) | 6 |" in table
    assert "−25.0 [" in table
    only_anchor = {
        **report,
        "caches": ["anchor"],
        "tasks": {t: {"anchor": dict(r["anchor"])} for t, r in report["tasks"].items()},
    }
    assert intervals.add_accuracy_intervals(only_anchor, samples=10)["differences"] == {}
