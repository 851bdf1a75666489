"""Per-step measurements that need the simulator's exact oracle (used by the studies).

A probe is called by :func:`sims.runner.train` after each exploration step with the step's
:class:`~deepgrpo.explore.ExploreResult` and a :class:`sims.runner.StepContext` (the exact
success table under the sampling policy, the estimator, the config); it returns extra columns
for that step's history row.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from deepgrpo.estimators import PositionLogistic, StateLogistic
from deepgrpo.explore import ExploreResult

RELIABILITY_BINS = 10


def prefix_oracle_success(res: ExploreResult, W: torch.Tensor, traj: np.ndarray, prefix_len: np.ndarray) -> np.ndarray:
    """``[N]`` exact P(success | prefix) of one continuation from main rows ``traj`` cut after
    ``prefix_len`` tokens (:func:`sims.oracle.prefix_success`), as numpy."""
    from sims.oracle import prefix_success
    if len(traj) == 0:
        return np.zeros(0)
    rows = torch.from_numpy(np.asarray(traj, dtype=np.int64))
    plen = torch.from_numpy(np.asarray(prefix_len, dtype=np.int64))
    return prefix_success(W, res.main.extras, rows, plen).double().numpy()


class DilutionProbe:
    """Dense vs dispersed branching: how often a failed chain gets a correct suffix, and how
    noisy the local (aux) baseline is.

    Columns: ``found_rate`` (failed chains with branches of which >= 1 continuation succeeded),
    ``baseline_var`` (mean over branch points of q(1-q)/n: the variance of the group-mean
    baseline of n continuations with exact success probability q), ``zero_signal_points``
    (points whose continuations all agree: zero aux advantage).
    """

    def __call__(self, res: ExploreResult, ctx: Any) -> dict[str, float]:
        plan = res.plan
        if len(plan) == 0:
            return {"found_rate": float("nan"), "baseline_var": float("nan"), "zero_signal_points": float("nan")}
        trajs, inv = np.unique(plan.traj, return_inverse=True)
        found = np.bincount(inv, weights=res.labels, minlength=len(trajs)) > 0
        q = prefix_oracle_success(res, ctx.W, plan.traj, plan.prefix_len)
        point = np.repeat(np.arange(len(plan)), plan.n)
        r = res.aux.rewards.double().numpy()
        ok = np.bincount(point, weights=r, minlength=len(plan))
        agree = (ok == 0) | (ok == plan.n)
        return {"found_rate": float(found.mean()), "baseline_var": float(np.mean(q * (1 - q) / plan.n)),
                "zero_signal_points": float(agree.mean())}


class CalibrationProbe:
    """Calibration of recoverability estimators against the exact oracle.

    Two *shadow* estimators, :class:`~deepgrpo.estimators.PositionLogistic` (the paper's) and
    :class:`~deepgrpo.estimators.StateLogistic`, are fed exactly the (features, label) pairs of
    the run's branch points, so they are compared on the same data whatever drives the run.
    Before each update both predict every candidate of the step's failed chains; the target is
    the oracle's P(>= 1 of K continuations succeeds) = 1 - (1 - q)^K.

    Columns per estimator e ∈ {pos, state}: ``mse_e`` (mean (p̂ - target)²), ``ece_e``
    (expected calibration error over 10 equal-width bins of p̂), ``brier_e`` (mean (p̂ - y)² on
    the branch points' realised labels y). NaN until the estimator is fitted. Reliability
    bins are accumulated over steps and emitted as ``rel_{e}_{p|q|n}{j}`` on every row
    (cumulative so far).
    """

    def __init__(self, K: int) -> None:
        self.K = K
        self.estimators = {"pos": PositionLogistic(), "state": StateLogistic()}
        B = RELIABILITY_BINS
        self.bins = {e: np.zeros((3, B)) for e in self.estimators}  # sum p̂, sum target, count

    def __call__(self, res: ExploreResult, ctx: Any) -> dict[str, float]:
        cands, plan = res.candidates, res.plan
        out: dict[str, float] = {}
        target = None
        if len(cands):
            q = prefix_oracle_success(res, ctx.W, cands.traj, cands.prefix_len)
            target = 1.0 - (1.0 - q) ** self.K
        for name, est in self.estimators.items():
            mse = ece = brier = float("nan")
            if est.ready and target is not None:
                p = est.predict(cands.features)
                mse = float(np.mean((p - target) ** 2))
                idx = np.minimum((p * RELIABILITY_BINS).astype(int), RELIABILITY_BINS - 1)
                s_p = np.bincount(idx, weights=p, minlength=RELIABILITY_BINS)
                s_q = np.bincount(idx, weights=target, minlength=RELIABILITY_BINS)
                cnt = np.bincount(idx, minlength=RELIABILITY_BINS).astype(float)
                ece = float(np.sum(np.abs(s_p - s_q)) / cnt.sum())
                self.bins[name] += np.stack([s_p, s_q, cnt])
                if len(plan):
                    brier = float(np.mean((p[plan.candidate] - res.labels) ** 2))
            out[f"mse_{name}"], out[f"ece_{name}"], out[f"brier_{name}"] = mse, ece, brier
            if len(plan):
                est.update({k: v[plan.candidate] for k, v in cands.features.items()}, res.labels)
            b = self.bins[name]
            for j in range(RELIABILITY_BINS):
                n = b[2, j]
                out[f"rel_{name}_p{j}"] = b[0, j] / n if n else float("nan")
                out[f"rel_{name}_q{j}"] = b[1, j] / n if n else float("nan")
                out[f"rel_{name}_n{j}"] = n
        return out


PROBES = {"dilution": DilutionProbe, "calibration": CalibrationProbe}
"""Probe name -> class (constructed per run by the studies' worker)."""
