"""Statistics over seeds: means with t confidence intervals and paired differences (scipy.stats)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import special

# Student-t tails through scipy.special's ufuncs (stdtr: CDF, stdtrit: its inverse): the values of
# scipy.stats.t and ttest_rel / ttest_1samp without their per-call overhead (about 1 ms each),
# which dominated the regime map's thousands of comparisons.


def _t_interval(mean: float, sem: float, n: int, confidence: float) -> tuple[float, float]:
    """The two-sided Student-t interval ``mean ± t_{(1+c)/2, n-1} · sem``."""
    q = float(special.stdtrit(n - 1, (1 + confidence) / 2))
    return mean - q * sem, mean + q * sem


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
    lo, hi = _t_interval(m, float(x.std(ddof=1) / np.sqrt(n)), n, confidence)
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
    lo, hi = _t_interval(float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size)), d.size, confidence)
    return Estimate(float(d.mean()), float(lo), float(hi), int(d.size), confidence)


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


# ------------------------------------------------------------------------------------------
# families of paired comparisons: Holm correction and equivalence tests

ALPHA = 0.05
"""Family-wise error rate of every finding (95 % intervals)."""

EQUIVALENCE_MARGIN = 0.02
"""Margin δ of the equivalence test (TOST) on pass@1-scale values (pass@1 at the budget, or
its area over the budget range, both in [0, 1]): two methods are called equivalent only if
their paired difference is shown to lie within (-δ, +δ)."""


POWER = 0.8
"""Power at which a minimum detectable effect is stated."""


def minimum_detectable_effect(a, b, tests: int = 1, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true mean of ``a - b`` (paired arrays) that a two-sided paired t-test at level
    ``alpha / tests`` (the strictest step of Holm over ``tests`` comparisons) detects with
    probability ``power``, at the spread of the observed differences:
    ``(t_{1 - α/(2·tests), n-1} + t_{power, n-1}) · sd / √n`` (the usual approximation that
    ignores the non-central t). NaN with fewer than two pairs; 0 if every difference is equal."""
    d = _paired_diffs(a, b)
    n = d.size
    if n < 2:
        return float("nan")
    q = float(special.stdtrit(n - 1, 1 - alpha / (2 * tests)) + special.stdtrit(n - 1, power))
    return q * float(d.std(ddof=1)) / float(np.sqrt(n))


def holm(pvalues) -> np.ndarray:
    """Holm-adjusted p-values of a family (step-down: the i-th smallest of m p-values is
    multiplied by m - i + 1 (i = 1..m), then made non-decreasing and capped at 1). NaN entries
    stay NaN and are not counted in m."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    q = p[ok]
    m = q.size
    if m == 0:
        return out
    order = np.argsort(q, kind="stable")
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * q[order]))
    res = np.empty(m)
    res[order] = adj
    out[ok] = res
    return out


def holm_confidence(pvalues, alpha: float = ALPHA) -> np.ndarray:
    """Confidence level of each comparison's interval under Holm: the i-th smallest of m
    p-values is tested at level alpha / (m - i + 1), so its interval has confidence
    1 - alpha / (m - i + 1) (it excludes 0 exactly when that test rejects). Holm stops at the
    first p-value it does not reject (rank j): that one and every larger one get rank j's level,
    so their intervals include 0, as their verdicts say. NaN p-values get the Bonferroni level
    1 - alpha / m."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = max(int(np.isfinite(p).sum()), 1)
    out = np.full(p.shape, 1.0 - alpha / m)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    levels = alpha / (m - np.arange(order.size))  # the step-down thresholds, rank 1..m
    stop = np.flatnonzero(p[order] >= levels)  # ranks Holm does not reject
    if stop.size:
        levels[stop[0]:] = levels[stop[0]]
    out[order] = 1.0 - levels
    return out


def _paired_diffs(a, b) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples need equal shapes, got {a.shape} and {b.shape}")
    ok = np.isfinite(a) & np.isfinite(b)
    return a[ok] - b[ok]


def paired_pvalue(a, b) -> float:
    """Two-sided p-value of the paired t-test of mean(a - b) = 0 (``scipy.stats.ttest_rel``);
    NaN with fewer than two pairs; 1 or 0 when every difference is equal (0 or not)."""
    d = _paired_diffs(a, b)
    if d.size < 2:
        return float("nan")
    if np.all(d == d[0]):
        return 1.0 if d[0] == 0 else 0.0
    t = float(d.mean() / (d.std(ddof=1) / np.sqrt(d.size)))
    return float(2 * special.stdtr(d.size - 1, -abs(t)))


def tost_pvalue(a, b, margin: float) -> float:
    """p-value of the paired two-one-sided-tests equivalence test (TOST) of
    H0: |mean(a - b)| >= margin against H1: |mean(a - b)| < margin: the larger of the p-values
    of the one-sided t-tests of mean > -margin and mean < +margin (n - 1 degrees of freedom).
    Equivalence is shown at level alpha when it is below alpha (equivalently, when the
    1 - 2·alpha interval lies within (-margin, +margin)). NaN with fewer than two pairs."""
    if not margin > 0:
        raise ValueError(f"margin = {margin} is invalid: expected a number > 0")
    d = _paired_diffs(a, b)
    n = d.size
    if n < 2:
        return float("nan")
    m = float(d.mean())
    se = float(d.std(ddof=1) / np.sqrt(n))
    if se == 0:
        return 0.0 if abs(m) < margin else 1.0
    p_low = special.stdtr(n - 1, -(m + margin) / se)  # H0: mean <= -margin (upper tail of t)
    p_high = special.stdtr(n - 1, (m - margin) / se)  # H0: mean >= +margin
    return float(max(p_low, p_high))


@dataclass(frozen=True)
class Comparison:
    """One paired comparison of a family, after Holm correction.

    name: what the reference is compared with; diff: mean of (reference - other) over paired
    seeds with its Holm interval (confidence ``diff.confidence``, see :func:`holm_confidence`);
    p: raw two-sided p-value; p_holm: Holm-adjusted; p_tost_holm: Holm-adjusted TOST p-value
    (equivalence within ``margin``); alpha: family-wise level.
    """

    name: str
    diff: Estimate
    p: float
    p_holm: float
    p_tost_holm: float
    margin: float
    alpha: float = ALPHA

    @property
    def verdict(self) -> str:
        """``higher`` / ``lower`` (Holm-significant difference), ``equivalent`` (TOST shows
        |difference| < margin after Holm), else ``inconclusive`` (also with fewer than 2 seeds)."""
        if np.isfinite(self.p_holm) and self.p_holm < self.alpha:
            return "higher" if self.diff.mean > 0 else "lower"
        if np.isfinite(self.p_tost_holm) and self.p_tost_holm < self.alpha:
            return "equivalent"
        return "inconclusive"

    def fmt(self, digits: int = 3) -> str:
        """``name: +0.023 [+0.004, +0.042], higher (Holm p = 0.012)``; an equivalence names its
        margin; an interval that cannot be computed (one seed) is left out."""
        d = self.diff
        iv = (f" [{d.low:+.{digits}f}, {d.high:+.{digits}f}]" if np.isfinite(d.low) else "")
        v = self.verdict
        if v in ("higher", "lower"):
            why = f"{v} (Holm p = {self.p_holm:.3g})"
        elif v == "equivalent":
            why = f"equivalent within ±{self.margin:g} (TOST Holm p = {self.p_tost_holm:.3g})"
        elif not np.isfinite(self.p):
            why = f"inconclusive (n = {d.n} paired seeds)"
        else:
            why = f"inconclusive (Holm p = {self.p_holm:.3g}; equivalence within ±{self.margin:g} not shown)"
        return f"{self.name}: {d.mean:+.{digits}f}{iv}, {why}"


def compare_pairs(pairs: list[tuple[str, pd.DataFrame, pd.DataFrame]], value: str,
                  margin: float = EQUIVALENCE_MARGIN, alpha: float = ALPHA, seed: str = "seed") -> list[Comparison]:
    """One family of paired comparisons: for each ``(name, a, b)`` (frames with one row per
    seed), the mean of ``a[value] - b[value]`` over the seeds both hold; p-values and TOST
    p-values Holm-corrected over the family, each difference with its Holm interval
    (:func:`holm_confidence`)."""
    arrays = []
    for name, a, b in pairs:
        sa, sb = a.set_index(seed)[value], b.set_index(seed)[value]
        if not (sa.index.is_unique and sb.index.is_unique):
            raise ValueError(f"comparison {name!r} needs one row per {seed} on each side")
        common = sa.index.intersection(sb.index)
        arrays.append((name, sa.loc[common].to_numpy(np.float64), sb.loc[common].to_numpy(np.float64)))
    return compare_arrays(arrays, margin, alpha)


def compare_arrays(arrays: list[tuple[str, np.ndarray, np.ndarray]], margin: float = EQUIVALENCE_MARGIN,
                   alpha: float = ALPHA) -> list[Comparison]:
    """:func:`compare_pairs` on already paired arrays ``(name, a [n], b [n])`` (element i of
    ``a`` and of ``b`` come from the same seed)."""
    p = np.array([paired_pvalue(a, b) for _, a, b in arrays])
    p_tost = np.array([tost_pvalue(a, b, margin) for _, a, b in arrays])
    p_holm, p_tost_holm, conf = holm(p), holm(p_tost), holm_confidence(p, alpha)
    return [Comparison(name, paired_difference(a, b, float(conf[i])), float(p[i]), float(p_holm[i]),
                       float(p_tost_holm[i]), margin, alpha) for i, (name, a, b) in enumerate(arrays)]


def compare_family(reference: pd.DataFrame, others: list[tuple[str, pd.DataFrame]], value: str,
                   margin: float = EQUIVALENCE_MARGIN, alpha: float = ALPHA, seed: str = "seed") -> list[Comparison]:
    """Paired comparisons of ``reference`` (one row per seed) against each frame in ``others``
    (``(name, frame)``, one row per seed) on column ``value``, as one Holm family
    (:func:`compare_pairs`). Seeds missing from either side of a pair are dropped from that pair."""
    return compare_pairs([(name, reference, frame) for name, frame in others], value, margin, alpha, seed)
