"""Statistics over seeds: means with t confidence intervals and paired differences (scipy.stats)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats


@dataclass(frozen=True)
class Estimate:
    """A mean with a two-sided confidence interval over n independent runs."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float = 0.95

    @property
    def half_width(self) -> float:
        """(high - low) / 2; NaN with fewer than two runs."""
        return (self.high - self.low) / 2

    def fmt(self, digits: int = 3) -> str:
        """``"0.512 ± 0.034"`` (``± nan`` with a single run)."""
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def mean_ci(values, confidence: float = 0.95) -> Estimate:
    """Mean of ``values`` ``[n]`` with the Student-t confidence interval (NaN bounds if n < 2;
    a zero-width interval if all values are equal)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    n = x.size
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0, confidence)
    m = float(x.mean())
    if n < 2:
        return Estimate(m, float("nan"), float("nan"), n, confidence)
    if np.all(x == x[0]):
        return Estimate(float(x[0]), float(x[0]), float(x[0]), n, confidence)
    sem = stats.sem(x)
    lo, hi = stats.t.interval(confidence, df=n - 1, loc=m, scale=sem)
    return Estimate(m, float(lo), float(hi), n, confidence)


def ci_errorbar(values, confidence: float = 0.95) -> tuple[float, float]:
    """``(low, high)`` of :func:`mean_ci` for seaborn's ``errorbar=`` (the mean twice when the
    interval is undefined, i.e. with a single value)."""
    e = mean_ci(values, confidence)
    return (e.low, e.high) if np.isfinite(e.low) else (e.mean, e.mean)


def paired_difference(a, b, confidence: float = 0.95) -> Estimate:
    """Mean of ``a - b`` over paired runs (same seeds) with its t confidence interval
    (``scipy.stats.ttest_rel``). Pairs with a non-finite member are dropped."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples need equal shapes, got {a.shape} and {b.shape}")
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    d = a - b
    if d.size < 2 or np.all(d == d[0]):
        return mean_ci(d, confidence)
    ci = stats.ttest_rel(a, b).confidence_interval(confidence)
    return Estimate(float(d.mean()), float(ci.low), float(ci.high), int(d.size), confidence)


def summarize(frame: pd.DataFrame, by: list[str], value: str, confidence: float = 0.95) -> pd.DataFrame:
    """One row per group of ``by`` with ``mean``, ``ci_low``, ``ci_high``, ``half_width``, ``n``
    of column ``value`` (one value per run expected)."""
    rows = []
    for key, g in frame.groupby(by, sort=False, dropna=False):
        e = mean_ci(g[value].to_numpy(), confidence)
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(by, key)), "mean": e.mean, "ci_low": e.low, "ci_high": e.high,
                     "half_width": e.half_width, "n": e.n})
    return pd.DataFrame(rows)


def paired_rows(a: pd.DataFrame, b: pd.DataFrame, value: str, seed: str = "seed") -> Estimate:
    """Paired difference of ``value`` between the runs in frame ``a`` and those in frame ``b``
    (one row per seed in each), matched on ``seed``; seeds present in only one frame are dropped."""
    pa = a.set_index(seed)[value]
    pb = b.set_index(seed)[value]
    if not (pa.index.is_unique and pb.index.is_unique):
        raise ValueError(f"paired_rows needs one row per {seed} in each frame")
    common = pa.index.intersection(pb.index)
    return paired_difference(pa.loc[common].to_numpy(), pb.loc[common].to_numpy())


def paired_by_seed(frame: pd.DataFrame, column: str, value: str, a, b, seed: str = "seed") -> Estimate:
    """Paired difference of ``value`` between rows with ``column == a`` and ``column == b``,
    matched on ``seed`` (one row per (column, seed) expected)."""
    return paired_rows(frame[frame[column] == a], frame[frame[column] == b], value, seed)
