"""Bootstrap confidence intervals for evaluation results (numpy only, vectorised).

Every interval is a percentile bootstrap: the statistic is recomputed on
`samples` resamples (with replacement) of the units — documents for accuracy,
rows of text for perplexity — drawn from `numpy.random.default_rng(seed)`, and
the interval is the central `level` share of those values. The same seed gives
the same interval, bit for bit.

    mean_ci(correct_N)                      accuracy of one task
    paired_difference_ci(a_N, b_N)          mean(a − b) on the same documents (one resample for both)
    task_average_ci([correct_N1, ...])      the unweighted average over tasks; each replicate
                                            resamples documents within each task (stratified)
    ratio_of_sums_ci(num_N, den_N)          Σ num / Σ den, e.g. NLL per token over rows

Pairing matters: anchor and full cache are scored on the same documents, so the
difference of their accuracies varies much less than either accuracy; the
paired interval resamples the per-document differences and is that much narrower.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

SAMPLES = 10_000  # bootstrap resamples
SEED = 0
LEVEL = 0.95
_CHUNK_ELEMENTS = 1 << 22  # resampled indices drawn per chunk (bounds memory for large N)


@dataclasses.dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap interval [low, high]."""

    estimate: float
    low: float
    high: float

    def scaled(self, factor: float) -> Interval:
        return Interval(self.estimate * factor, self.low * factor, self.high * factor)

    def as_list(self) -> list[float]:
        """[low, high], as stored in the JSON reports."""
        return [self.low, self.high]


def _as_units(x, name: str) -> np.ndarray:
    x_N = np.asarray(x, dtype=np.float64)
    if x_N.ndim != 1 or x_N.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-d sequence, got shape {x_N.shape}")
    if not np.all(np.isfinite(x_N)):
        raise ValueError(f"{name} holds non-finite values")
    return x_N


def _check(samples: int, level: float) -> None:
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")


def _resampled_sums(cols_NxK: np.ndarray, rng: np.random.Generator, samples: int) -> np.ndarray:
    """[samples, K] column sums of `samples` resamples of the N rows (drawn in chunks)."""
    n = cols_NxK.shape[0]
    per_chunk = max(1, _CHUNK_ELEMENTS // n)
    out = []
    for start in range(0, samples, per_chunk):
        idx_SxN = rng.integers(0, n, size=(min(per_chunk, samples - start), n))
        out.append(cols_NxK[idx_SxN].sum(axis=1))
    return np.concatenate(out)


def _interval(estimate: float, replicates_S: np.ndarray, level: float) -> Interval:
    tail = (1 - level) / 2
    low, high = np.quantile(replicates_S, [tail, 1 - tail])
    return Interval(float(estimate), float(low), float(high))


def ratio_of_sums_ci(num, den, samples: int = SAMPLES, seed: int = SEED, level: float = LEVEL) -> Interval:
    """Σ num / Σ den over N units, resampling units (num_N, den_N paired by index; den_N > 0)."""
    _check(samples, level)
    num_N, den_N = _as_units(num, "num"), _as_units(den, "den")
    if num_N.shape != den_N.shape:
        raise ValueError(f"num and den differ in length: {num_N.size} vs {den_N.size}")
    if np.any(den_N <= 0):
        raise ValueError("den must be > 0 for every unit")
    sums_Sx2 = _resampled_sums(np.stack([num_N, den_N], axis=1), np.random.default_rng(seed), samples)
    return _interval(num_N.sum() / den_N.sum(), sums_Sx2[:, 0] / sums_Sx2[:, 1], level)


def mean_ci(x, samples: int = SAMPLES, seed: int = SEED, level: float = LEVEL) -> Interval:
    """Mean of x_N (e.g. per-document correctness 0/1) with its bootstrap interval over the N units."""
    return task_average_ci([x], samples, seed, level)


def paired_difference_ci(a, b, samples: int = SAMPLES, seed: int = SEED, level: float = LEVEL) -> Interval:
    """mean(a) − mean(b) of two results on the same N units: one resample serves both."""
    a_N, b_N = _as_units(a, "a"), _as_units(b, "b")
    if a_N.shape != b_N.shape:
        raise ValueError(f"paired results differ in length: {a_N.size} vs {b_N.size}")
    return mean_ci(a_N - b_N, samples, seed, level)


def task_average_ci(per_task: Sequence, samples: int = SAMPLES, seed: int = SEED, level: float = LEVEL) -> Interval:
    """Unweighted average over tasks of each task's mean (per_task: one 1-d array per task).

    Each replicate resamples documents within every task (tasks keep their sizes)
    and averages the T resampled means; one generator, tasks drawn in order.
    A paired average difference is `task_average_ci([a_t − b_t for each task])`.
    """
    _check(samples, level)
    if len(per_task) == 0:
        raise ValueError("task_average_ci needs at least one task")
    xs = [_as_units(x, f"task {i}") for i, x in enumerate(per_task)]
    rng = np.random.default_rng(seed)
    means_TxS = np.stack([_resampled_sums(x_N[:, None], rng, samples)[:, 0] / x_N.size for x_N in xs])
    return _interval(float(np.mean([x_N.mean() for x_N in xs])), means_TxS.mean(axis=0), level)
