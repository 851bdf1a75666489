"""Training in the simulator with the core's exploration step and loss, logged against the
exact oracle.

One training step (paper arXiv 2602.14169, Alg. 1): draw a batch of problems, call
:func:`deepgrpo.explore` (main chains, pivots, branches, advantages) and
:func:`deepgrpo.update_policy` (dual-stream loss, Adam). Every method runs through exactly this
loop; only its :class:`~deepgrpo.config.AlgoConfig` differs.

History: one tidy row per step; step 0 is the pre-trained policy before any update. The
core's columns (budget, rewards, pivots, branch success, loss parts, estimator; see
:mod:`deepgrpo.step`) plus the simulator's own, from the exact oracle:

=========================  ==========================================================================
``pass1``, ``pass{k}``      exact mean pass@1 / pass@k over *all* problems after the step's update
``entropy``                 mean entropy (nats) of π(· | problem, step, on-track)
``pivot_before_error``      fraction of branch points at or before their chain's first error
                            (prefix fully on track: the crux is re-entered)
``pivot_oracle_success``    mean exact P(success | branch prefix) under the sampling policy
=========================  ==========================================================================

Wall times are not in the history (it must be identical for identical seeds); they are in
``run.json`` (``wall_time_s``, ``step_wall_time_s``).

Speed: the tensors are tiny ([batch, V] per step), so torch's intra-op threads only add
overhead; call ``torch.set_num_threads(1)`` in any process that trains (``deepgrpo sim`` does).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from deepgrpo.config import AlgoConfig, check_choice, check_range
from deepgrpo.estimators import make_estimator
from deepgrpo.explore import explore
from deepgrpo.step import initial_record, step_record, update_policy
from deepgrpo.ledger import BUDGET_UNITS, BudgetLedger, budget_left
from deepgrpo.records import versions, write_csv_atomic, write_json_atomic
from sims.adam import LogitAdam
from sims.backend import SimBackend
from sims.oracle import ExactOracle, exact_pass_at_k, prefix_success
from sims.policy import TokenTreePolicy
from sims.spec import ON_TRACK, ProblemSet, TokenTreeSpec


@dataclass
class RunnerConfig:
    """The training loop around the core.

    steps: training steps (policy updates).
    batch_problems: problems per step, drawn without replacement (paper: 64 prompts per step;
        the default is half of the default 32-problem set).
    lr: Adam learning rate on the logits (the paper's AdamW 1e-6 is for LLM weights; tabular
        logits need a large one).

    Defaults (12 steps x 16 problems, lr 0.2) are those of ``deepgrpo sim compare``: chosen so
    that, on the default spec, the six compared methods finish in well under a second of CPU
    and keep the same order over seeds 0-5 (GRPO N = 8 < 16 < 32 < 64, TreeRL-like <
    DEEP-GRPO by 0.026-0.058 pass@1 at equal branching budget).
    max_grad_norm: gradient clipping (paper: 1.0); None = off.
    pass_k: k of the logged exact pass@k (paper reports pass@k curves; 8 = G).
    micro_batch_size: rows per micro-batch of the update (None = whole batch).
    budget: stop at the first step boundary where the run has spent at least this much
        (in ``budget_unit``; it overshoots by less than one step), so that methods are compared
        at equal total budget with cheaper methods taking more steps; ``steps`` stays a cap.
        None = run exactly ``steps`` steps.
    budget_unit: ``rollouts`` (main + aux) or ``tokens`` (generated tokens, main + aux).
    """

    steps: int = 12
    batch_problems: int = 16
    lr: float = 0.2
    max_grad_norm: float | None = 1.0
    pass_k: int = 8
    micro_batch_size: int | None = None
    budget: int | None = None
    budget_unit: str = "tokens"

    def __post_init__(self) -> None:
        o = type(self).__name__
        check_range(o, "steps", self.steps, 0, None, integer=True)
        if self.budget is not None:
            check_range(o, "budget", self.budget, 1, None, integer=True)
        check_choice(o, "budget_unit", self.budget_unit, BUDGET_UNITS)
        check_range(o, "batch_problems", self.batch_problems, 1, None, integer=True)
        check_range(o, "lr", self.lr, 0.0, None, lo_open=True)
        if self.max_grad_norm is not None:
            check_range(o, "max_grad_norm", self.max_grad_norm, 0.0, None, lo_open=True)
        check_range(o, "pass_k", self.pass_k, 1, None, integer=True)
        if self.micro_batch_size is not None:
            check_range(o, "micro_batch_size", self.micro_batch_size, 1, None, integer=True)


@dataclass
class StepContext:
    """What a probe sees besides the step's :class:`~deepgrpo.explore.ExploreResult`.

    step: the step number (1-based).
    W: ``DoubleTensor [n, T + 1, 2]`` exact P(success | step, status) under the *sampling*
        policy of this step (see :mod:`sims.oracle`).
    estimator: the run's recoverability estimator (already updated with this step's labels).
    algo, spec: the run's configs; problems, policy: the problem set and the (not yet updated)
    policy.
    """

    step: int
    W: torch.Tensor
    estimator: Any
    algo: AlgoConfig
    spec: TokenTreeSpec
    problems: ProblemSet
    policy: TokenTreePolicy


Probe = Callable[[Any, StepContext], dict[str, float]]
"""A per-step measurement: ``probe(explore_result, context) -> extra history columns``; called
after the exploration step and before the policy update."""


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    history: list[dict[str, Any]]
    wall_time_s: float
    step_wall_time_s: list[float]
    ledger: BudgetLedger
    problems: ProblemSet
    policy: TokenTreePolicy
    estimator: Any


def _seeds(seed: int) -> tuple[torch.Generator, np.random.Generator, np.random.Generator]:
    """Independent streams from one run seed: torch sampler, problem batches, core choices."""
    ss = np.random.SeedSequence(seed)
    torch_seed, batch_ss, core_ss = ss.spawn(3)
    gen = torch.Generator().manual_seed(int(torch_seed.generate_state(1, np.uint64)[0] >> np.uint64(1)))
    return gen, np.random.default_rng(batch_ss), np.random.default_rng(core_ss)


def _nan_stats(x: np.ndarray) -> tuple[float, float]:
    return (float(x.mean()), float(x.std())) if x.size else (float("nan"), float("nan"))


def train(spec: TokenTreeSpec, algo: AlgoConfig, config: RunnerConfig | None = None, seed: int = 0,
          method: str = "", progress: bool = False,
          on_step: Callable[[dict[str, Any]], None] | None = None,
          probes: Sequence[Probe] = ()) -> TrainResult:
    """Train a fresh pre-trained policy of ``spec`` with ``algo`` for ``config.steps`` steps.

    Args:
        spec: the simulated problem set.
        algo: the method's configuration (e.g. ``method_config("deep-grpo")``).
        config: the loop (:class:`RunnerConfig`).
        seed: run seed (sampling, problem batches, the core's random choices); the problem set
            itself is drawn from ``spec.seed``.
        method: a label stored in each history row.
        progress: show a tqdm progress bar.
        on_step: called with each history row as it is produced.
        probes: per-step measurements (:data:`Probe`); their columns are appended to the step's
            row (NaN-free rows only from step 1: step 0 has no exploration).

    Returns: :class:`TrainResult` (history rows: see the module docstring).
    """
    cfg = config or RunnerConfig()
    t_start = time.perf_counter()
    problems = spec.build()
    policy = TokenTreePolicy(problems)
    gen, batch_rng, core_rng = _seeds(seed)
    backend = SimBackend(problems, policy, gen)
    oracle = ExactOracle(problems, policy)
    estimator = make_estimator(algo.estimator)
    ledger = BudgetLedger()
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = LogitAdam(params, lr=cfg.lr)
    k = cfg.pass_k
    n_batch = min(cfg.batch_problems, problems.n)

    table: list[torch.Tensor] = []  # the latest oracle table [n, T+1, 2] (= the next step's sampling policy)

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            W = oracle.table()
            p1 = W[:, 0, ON_TRACK]  # [n]
            ent = policy.entropy()[:, :, ON_TRACK]
        table[:] = [W]
        return {"pass1": float(p1.mean()), f"pass{k}": float(exact_pass_at_k(p1, k).mean()), "entropy": float(ent.mean())}

    nan = float("nan")
    row0: dict[str, Any] = {"method": method, "seed": seed, "step": 0, **evaluate(), **initial_record(estimator),
                            "pivot_before_error": nan, "pivot_oracle_success": nan}
    history = [row0]
    if on_step:
        on_step(row0)
    step_wall: list[float] = []
    steps = range(1, cfg.steps + 1)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc=method or "train", unit="step", leave=False)
    for step in steps:
        if not budget_left(ledger, cfg.budget, cfg.budget_unit):
            break
        t0 = time.perf_counter()
        prompts = [int(p) for p in np.sort(batch_rng.choice(problems.n, size=n_batch, replace=False))]
        W = table[0]  # [n, T+1, 2] exact values under the sampling policy (evaluated after the last update)
        res = explore(backend, prompts, algo, estimator, core_rng, ledger)
        plan = res.plan
        oracle_cols = {"pivot_before_error": nan, "pivot_oracle_success": nan}
        if len(plan):
            traj = torch.from_numpy(plan.traj)
            plen = torch.from_numpy(plan.prefix_len)
            first_error = res.main.extras["first_error"][traj]  # [P]
            oracle_cols["pivot_before_error"] = float((plen <= first_error).double().mean())
            oracle_cols["pivot_oracle_success"] = float(prefix_success(W, res.main.extras, traj, plen).mean())
        probed: dict[str, float] = {}
        if probes:
            ctx = StepContext(step=step, W=W, estimator=estimator, algo=algo, spec=spec, problems=problems,
                              policy=policy)
            for probe in probes:
                probed.update(probe(res, ctx))
        metrics = update_policy(backend, res.batch, algo.loss, optimizer, params,
                                micro_batch_size=cfg.micro_batch_size, max_grad_norm=cfg.max_grad_norm)
        row = {"method": method, "seed": seed, "step": step, **evaluate(),
               **step_record(res, metrics, ledger, estimator), **oracle_cols, **probed}
        history.append(row)
        step_wall.append(time.perf_counter() - t0)
        if on_step:
            on_step(row)
    return TrainResult(history=history, wall_time_s=time.perf_counter() - t_start, step_wall_time_s=step_wall,
                       ledger=ledger, problems=problems, policy=policy, estimator=estimator)


def run_record(spec: TokenTreeSpec, algo: AlgoConfig, config: RunnerConfig, seed: int, method: str,
               result: TrainResult) -> dict[str, Any]:
    """The JSON run record: resolved config (spec, algo, runner), seed, versions, wall time, budget."""
    last = result.history[-1]
    return {
        "kind": "sim-run", "method": method, "seed": seed,
        "config": {"spec": spec.to_dict(), "algo": algo.to_dict(), "runner": dataclasses.asdict(config)},
        "versions": versions(), "wall_time_s": result.wall_time_s, "step_wall_time_s": result.step_wall_time_s,
        "budget": result.ledger.totals(),
        "final": {"pass1": last["pass1"], f"pass{config.pass_k}": last[f"pass{config.pass_k}"],
                  "initial_pass1": result.history[0]["pass1"]},
    }


def history_frame(rows: list[dict[str, Any]]):
    """The history rows as a pandas DataFrame (column order as produced)."""
    import pandas as pd
    return pd.DataFrame(rows)


def write_run(out: str | Path, spec: TokenTreeSpec, algo: AlgoConfig, config: RunnerConfig, seed: int,
              method: str, result: TrainResult) -> tuple[Path, Path]:
    """Write ``out/history.csv`` and ``out/run.json`` atomically; returns their paths."""
    out = Path(out)
    hist = write_csv_atomic(out / "history.csv", history_frame(result.history))
    rec = write_json_atomic(out / "run.json", run_record(spec, algo, config, seed, method, result))
    return hist, rec
