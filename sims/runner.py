"""Training in the simulator with the core's exploration step and loss, logged against the
exact oracle.

One training step (paper arXiv 2602.14169, Alg. 1): draw a batch of training problems, call
:func:`deepgrpo.explore` (main chains, pivots, branches, advantages) and
:func:`deepgrpo.update_policy` (dual-stream loss; Adam or SGD). Every method runs through
exactly this loop; only its :class:`~deepgrpo.config.AlgoConfig` differs.

The problem set is drawn per run seed unless the spec pins one (:mod:`sims.spec`); its held-out
problems are never in a training batch. Under the ``tabular`` policy they keep their
pre-trained logits exactly; under the ``features`` policy (shared weights, :mod:`sims.policy`)
training moves them.

History: one tidy row per step; step 0 is the pre-trained policy before any update. The
core's columns (budget, rewards, pivots, branch success, loss parts, estimator; see
:mod:`deepgrpo.step`) plus the simulator's own, from the exact oracle:

=========================  ==========================================================================
``pass1``, ``pass{k}``      exact mean pass@1 / pass@k over the *training* problems after the step's
                            update
``heldout_pass1``,          the same over the held-out problems (NaN when ``n_heldout = 0``)
``heldout_pass{k}``
``entropy``                 mean entropy (nats) of π(· | problem, step, on-track) over the training
                            problems' steps
``problem_set_seed``        the run's effective problem-set seed (same in every row)
``pivot_before_error``      fraction of branch points at or before their chain's first error
                            (prefix fully on track: the crux is re-entered)
``pivot_oracle_success``    mean exact P(success | branch prefix) under the sampling policy
=========================  ==========================================================================

Wall times are not in the history (it must be identical for identical seeds); they are in
``run.json`` (``wall_time_s``, ``step_wall_time_s``).

Speed: the tensors are tiny ([batch, V] per step), so torch's intra-op threads only add
overhead; call ``torch.set_num_threads(1)`` in any process that trains (``deepgrpo sim`` does).
What a step reads from the policy without gradient (log-probs, sampling CDF, the oracle table,
entropy) is computed once per set of weights (:meth:`~sims.policy.TokenTreePolicy.snapshot`):
the evaluation after an update and the next step's main chains and branches share it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepgrpo.config import AlgoConfig, check_choice, check_range, invalid
from deepgrpo.estimators import make_estimator
from deepgrpo.explore import explore
from deepgrpo.ledger import BUDGET_UNITS, BudgetLedger, budget_left
from deepgrpo.records import versions, write_csv_atomic, write_json_atomic
from deepgrpo.step import initial_record, step_record, update_policy
from sims.backend import SimBackend
from sims.memory import check_fits
from sims.optim import OPTIMIZERS, make_optimizer
from sims.oracle import exact_pass_at_k, prefix_success
from sims.policy import POLICY_CLASSES, TokenTreePolicy
from sims.spec import ON_TRACK, ProblemSet, TokenTreeSpec

MAX_FEATURE_ENTRIES = 1 << 27
"""Largest features table (entries of φ, float32: 512 MB) the ``features`` policy may build."""


@dataclass
class RunnerConfig:
    """The training loop around the core.

    steps: training steps (policy updates); a cap when ``budget`` is set.
    batch_problems: training problems per step, drawn without replacement (paper: 64 prompts
        per step; the default is half of the default 32-problem set).
    lr: learning rate of ``optimizer`` (the paper's AdamW 1e-6 is for LLM weights; the
        simulator's logits need a large one: 0.2 for Adam; plain SGD needs a far larger one,
        about 100 with the default clipping, as its steps scale with the gradient's size).
    policy: the policy class: ``tabular`` (a free logit table per problem; nothing transfers)
        or ``features`` (pre-trained logits plus shared weights through fixed random features
        of (problem, step, status, token), never told the correct token; see
        :mod:`sims.policy`).
    feature_dim: D, the number of shared weights (the capacity) of the ``features`` policy.
    optimizer: ``adam`` or ``sgd`` (plain SGD on the same loss; see :mod:`sims.optim`).
    max_grad_norm: gradient clipping (paper: 1.0); None = off.
    pass_k: k of the logged exact pass@k (paper reports pass@k curves; 8 = G).
    micro_batch_size: rows per micro-batch of the update (None = whole batch).
    budget: stop at the first step boundary where the run has spent at least this much
        (in ``budget_unit``; it overshoots by less than one step), so that methods are compared
        at equal total budget with cheaper methods taking more steps; ``steps`` stays a cap.
        None = run exactly ``steps`` steps.
    budget_unit: ``rollouts`` (main + aux) or ``tokens`` (generated tokens, main + aux).

    Defaults: 12 steps of 16 problems, Adam lr 0.2 on the tabular policy, no budget.
    ``deepgrpo sim compare`` runs to a token budget instead (:data:`sims.compare.COMPARE_RUNNER`).
    """

    steps: int = 12
    batch_problems: int = 16
    lr: float = 0.2
    policy: str = "tabular"
    feature_dim: int = 256
    optimizer: str = "adam"
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
        check_choice(o, "policy", self.policy, POLICY_CLASSES)
        check_range(o, "feature_dim", self.feature_dim, 1, None, integer=True)
        check_choice(o, "optimizer", self.optimizer, OPTIMIZERS)
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
        policy of this step (see :mod:`sims.oracle`); rows are all problems (training and
        held-out), indexed like the rollouts' ``problem`` extra.
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
    """What :func:`train` returns.

    problem_set_seed: the effective problem-set seed; problem_set_pinned: whether the spec
    pinned it (else it was derived from the run seed).
    """

    history: list[dict[str, Any]]
    wall_time_s: float
    step_wall_time_s: list[float]
    ledger: BudgetLedger
    problems: ProblemSet
    policy: TokenTreePolicy
    estimator: Any
    problem_set_seed: int = 0
    problem_set_pinned: bool = False


def run_streams(seed: int) -> tuple[torch.Generator, np.random.Generator, np.random.Generator]:
    """Independent streams from one run seed: torch sampler, problem batches, core choices
    (children 0-2 of ``SeedSequence(seed)``; child 3 is the problem set's,
    :func:`sims.spec.derived_problem_set_seed`)."""
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
        seed: run seed (sampling, problem batches, the core's random choices, and the problem
            set unless ``spec.seed`` pins it).
        method: a label stored in each history row.
        progress: show a tqdm progress bar.
        on_step: called with each history row as it is produced.
        probes: per-step measurements (:data:`Probe`); their columns are appended to the step's
            row (NaN-free rows only from step 1: step 0 has no exploration).

    Returns: :class:`TrainResult` (history rows: see the module docstring).

    Sizes whose tables or rollouts cannot fit in memory are a
    :class:`~deepgrpo.config.ConfigError` before anything is allocated (:mod:`sims.memory`).
    """
    cfg = config or RunnerConfig()
    check_fits(spec, cfg, algo)  # sizes that cannot fit in memory fail here, before any allocation
    t_start = time.perf_counter()
    ps_seed = spec.problem_set_seed(seed)
    problems = spec.build(run_seed=seed)
    if cfg.policy == "features" and problems.n * problems.T * 2 * problems.V * cfg.feature_dim > MAX_FEATURE_ENTRIES:
        raise invalid("RunnerConfig", "feature_dim", cfg.feature_dim,
                      f"at most {MAX_FEATURE_ENTRIES // (problems.n * problems.T * 2 * problems.V):,} for this problem "
                      f"set ({problems.n} problems x {problems.T} steps x 2 x {problems.V} tokens): the features "
                      f"policy stores one {cfg.feature_dim}-dim feature per (problem, step, status, token)")
    policy = TokenTreePolicy(problems, cfg.policy, cfg.feature_dim)
    gen, batch_rng, core_rng = run_streams(seed)
    backend = SimBackend(problems, policy, gen)
    estimator = make_estimator(algo.estimator)
    ledger = BudgetLedger()
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg.optimizer, params, cfg.lr)
    k = cfg.pass_k
    n_train = problems.n_train
    n_batch = min(cfg.batch_problems, n_train)
    train_steps = problems.step_mask()[:n_train]  # [n_train, T] steps a chain visits

    table: list[torch.Tensor] = []  # the latest oracle table [n, T+1, 2] (= the next step's sampling policy)

    def evaluate() -> dict[str, float]:
        # the weights' tables, computed once: the next step samples from the same snapshot
        snap = policy.snapshot()
        W = snap.success_table(problems)  # [n, T+1, 2]
        p1 = W[:, 0, ON_TRACK]  # [n] training problems first, then held-out ones
        ent = snap.entropy[:n_train, :, ON_TRACK]  # [n_train, T]
        table[:] = [W]
        tr, ho = p1[:n_train], p1[n_train:]
        nan = float("nan")
        return {"pass1": float(tr.mean()), f"pass{k}": float(exact_pass_at_k(tr, k).mean()),
                "heldout_pass1": float(ho.mean()) if len(ho) else nan,
                f"heldout_pass{k}": float(exact_pass_at_k(ho, k).mean()) if len(ho) else nan,
                "entropy": float(ent[train_steps].mean())}

    nan = float("nan")
    row0: dict[str, Any] = {"method": method, "seed": seed, "step": 0, "problem_set_seed": ps_seed, **evaluate(),
                            **initial_record(estimator),
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
        # training problems only (indices < n_train): held-out problems are never in a batch
        prompts = [int(p) for p in np.sort(batch_rng.choice(n_train, size=n_batch, replace=False))]
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
        row = {"method": method, "seed": seed, "step": step, "problem_set_seed": ps_seed, **evaluate(),
               **step_record(res, metrics, ledger, estimator), **oracle_cols, **probed}
        history.append(row)
        step_wall.append(time.perf_counter() - t0)
        if on_step:
            on_step(row)
    return TrainResult(history=history, wall_time_s=time.perf_counter() - t_start, step_wall_time_s=step_wall,
                       ledger=ledger, problems=problems, policy=policy, estimator=estimator,
                       problem_set_seed=ps_seed, problem_set_pinned=spec.pinned)


def _or_none(x: float) -> float | None:
    """NaN -> None (strict JSON has no NaN)."""
    return None if x != x else x


def run_record(spec: TokenTreeSpec, algo: AlgoConfig, config: RunnerConfig, seed: int, method: str,
               result: TrainResult) -> dict[str, Any]:
    """The JSON run record: resolved config (spec, algo, runner — policy class, capacity and
    optimizer included), seed, the effective problem-set seed and whether it was pinned,
    versions, wall time, budget, and the final and initial exact values."""
    last, first = result.history[-1], result.history[0]
    k = config.pass_k
    return {
        "kind": "sim-run", "method": method, "seed": seed,
        "problem_set_seed": result.problem_set_seed, "problem_set_pinned": result.problem_set_pinned,
        "config": {"spec": spec.to_dict(), "algo": algo.to_dict(), "runner": dataclasses.asdict(config)},
        "versions": versions(), "wall_time_s": result.wall_time_s, "step_wall_time_s": result.step_wall_time_s,
        "budget": result.ledger.totals(),
        "final": {"pass1": last["pass1"], f"pass{k}": last[f"pass{k}"],
                  "heldout_pass1": _or_none(last["heldout_pass1"]),
                  f"heldout_pass{k}": _or_none(last[f"heldout_pass{k}"]), "initial_pass1": first["pass1"],
                  "initial_heldout_pass1": _or_none(first["heldout_pass1"]), "steps": last["step"]},
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
