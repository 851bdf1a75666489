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
Many runs are trained faster together: :func:`train_replicas` advances R runs in lockstep through
the core's replica axis (one sampling call, one loss and one optimizer step for all of them), and
a run's history is the same alone or in any batch; :func:`train` is R = 1. The studies batch their
runs this way (:func:`analysis.studies.run_sim_cells`).
What a step reads from the policy without gradient (log-probs, sampling CDF, the oracle table,
entropy) is computed once per set of weights (:meth:`~sims.policy.TokenTreePolicy.snapshot`):
the evaluation after an update and the next step's main chains and branches share it.
"""

from __future__ import annotations

import copy
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
from deepgrpo.explore import explore_replicas
from deepgrpo.ledger import BUDGET_UNITS, BudgetLedger, budget_left
from deepgrpo.records import versions, write_csv_atomic, write_json_atomic
from deepgrpo.step import initial_record, step_record, update_replicas
from sims.backend import SimBackend
from sims.memory import check_fits
from sims.optim import OPTIMIZERS, make_optimizer
from sims.oracle import exact_pass_at_k, prefix_success
from sims.policy import POLICY_CLASSES, TokenTreePolicy
from sims.spec import ON_TRACK, SKILLS_DEFAULTS, ProblemSet, TokenTreeSpec

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
        of (problem, step, status, token), never told the correct token) or ``skills`` (a free
        table per problem plus one shared by the steps that call on the same skill, so learning
        transfers to held-out problems; needs ``TokenTreeSpec.n_skills >= 1``); see
        :mod:`sims.policy`.
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
    """Train a fresh pre-trained policy of ``spec`` with ``algo`` for ``config.steps`` steps
    (:func:`train_replicas` with one run).

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
    return train_replicas([spec], algo, [config or RunnerConfig()], [seed], [method], progress=progress,
                          on_step=(lambda r, row: on_step(row)) if on_step else None, probes=[probes])[0]


SHARED_RUNNER_FIELDS = ("batch_problems", "policy", "feature_dim", "optimizer", "max_grad_norm", "pass_k",
                        "micro_batch_size")
""":class:`RunnerConfig` fields that runs trained together must share (each run keeps its own
``lr``, ``steps``, ``budget`` and ``budget_unit``)."""


def train_replicas(specs: Sequence[TokenTreeSpec], algo: AlgoConfig, configs: Sequence[RunnerConfig],
                   seeds: Sequence[int], methods: Sequence[str] | None = None, progress: bool = False,
                   on_step: Callable[[int, dict[str, Any]], None] | None = None,
                   on_finish: Callable[[int, TrainResult], None] | None = None,
                   probes: Sequence[Sequence[Probe]] | None = None) -> list[TrainResult]:
    """Train R independent runs in lockstep: one exploration step and one policy update carry
    all the runs that have not yet reached their budget (or step cap), through the core's
    replica axis (:func:`deepgrpo.explore.explore_replicas`, :func:`deepgrpo.step.update_replicas`).

    Run r is ``train(specs[r], algo, configs[r], seeds[r], methods[r])``: its own problem set,
    weights, optimizer state and step size, estimator, budget ledger and random streams, so its
    history is the one it has alone, whatever runs share its batch. The runs share ``algo`` and
    the :data:`SHARED_RUNNER_FIELDS` of their configs, and their problem sets must have the same
    shape (their rules — difficulty spread, recovery — may differ).

    Args:
        on_step: called with ``(r, row)`` for each history row as it is produced.
        on_finish: called with ``(r, result)`` the moment run r stops (the others go on).
        probes: per run, its :data:`Probe` list (each run its own instances).

    Returns: the R :class:`TrainResult` in order. ``wall_time_s`` is the time until the run
    stopped; ``step_wall_time_s`` its share of each batched step (the step's time over the runs in it).
    """
    R = len(specs)
    if not (len(configs) == len(seeds) == R) or R == 0:
        raise ValueError(f"train_replicas needs one spec, config and seed per run; got {R}, {len(configs)}, "
                         f"{len(seeds)}")
    methods = list(methods) if methods is not None else [""] * R
    probes = list(probes) if probes is not None else [()] * R
    first = configs[0]
    for c in configs[1:]:
        for f in SHARED_RUNNER_FIELDS:
            if getattr(c, f) != getattr(first, f):
                raise ValueError(f"runs trained together must share RunnerConfig.{f}: {getattr(c, f)!r} != "
                                 f"{getattr(first, f)!r}")
    for spec, cfg in zip(specs, configs):
        check_fits(spec, cfg, algo)  # sizes that cannot fit in memory fail here, before any allocation
    t_start = time.perf_counter()
    ps_seeds = [spec.problem_set_seed(seed) for spec, seed in zip(specs, seeds)]
    sets = [spec.build(run_seed=seed) for spec, seed in zip(specs, seeds)]
    one = sets[0]
    if first.policy == "features" and one.n * one.T * 2 * one.V * first.feature_dim > MAX_FEATURE_ENTRIES:
        raise invalid("RunnerConfig", "feature_dim", first.feature_dim,
                      f"at most {MAX_FEATURE_ENTRIES // (one.n * one.T * 2 * one.V):,} for this problem "
                      f"set ({one.n} problems x {one.T} steps x 2 x {one.V} tokens): the features "
                      f"policy stores one {first.feature_dim}-dim feature per (problem, step, status, token)")
    if first.policy == "skills":
        for spec in specs:
            if spec.n_skills < 1:
                raise invalid("TokenTreeSpec", "n_skills", spec.n_skills,
                              "at least 1 with the skills policy, which learns through the skills problems share "
                              f"(its studies use {SKILLS_DEFAULTS['n_skills']})")
        if len({spec.n_skills for spec in specs}) > 1:
            raise ValueError("runs trained together under the skills policy must share TokenTreeSpec.n_skills")
    n = one.n
    streams = [run_streams(seed) for seed in seeds]
    batch_rngs = [s[1] for s in streams]
    core_rngs = [s[2] for s in streams]
    estimators = [make_estimator(algo.estimator) for _ in range(R)]
    ledgers = [BudgetLedger() for _ in range(R)]
    k = first.pass_k
    n_train = one.n_train
    n_batch = min(first.batch_problems, n_train)
    nan = float("nan")
    # The runs still training sit in slots: slot i holds run slots[i] (its problem p is problem
    # i·n + p of the stack, its weights row i). When enough runs have stopped, the slots are
    # compacted (:func:`_Slots.compact`): the step's per-run tensors then hold only the live runs.
    S = _Slots(list(range(R)), sets, first, configs, [s[0] for s in streams], n_train)

    def evaluate(runs: Sequence[int]) -> dict[int, dict[str, float]]:
        # the weights' tables, computed once: the next step samples from the same snapshot
        snap = S.policy.snapshot()
        W = snap.success_table(S.stacked)  # [R·n, T+1, 2] (R: the slots)
        S.table = W
        Rs = len(S.runs)
        # every run's values at once, each row reduced on its own (the same numbers for a run alone)
        p1 = np.ascontiguousarray(W.numpy()[:, 0, ON_TRACK].reshape(Rs, n))  # [R, n] training problems first
        tr, ho = np.ascontiguousarray(p1[:, :n_train]), np.ascontiguousarray(p1[:, n_train:])
        ent = snap.entropy[:, :, ON_TRACK].double().numpy().reshape(Rs, n, -1)[:, :n_train]  # [R, n_train, T]
        entropy = np.where(S.train_mask, ent, 0.0).reshape(Rs, -1).sum(1) / S.n_steps  # [R]
        pass1, passk = tr.mean(1), exact_pass_at_k(tr, k).mean(1)
        if ho.shape[1]:
            h1, hk = ho.mean(1), exact_pass_at_k(ho, k).mean(1)
        else:
            h1 = hk = np.full(Rs, nan)
        at = S.slot_of
        values = [v.tolist() for v in (pass1, passk, h1, hk, entropy)]  # Python floats, one conversion per array
        names = ("pass1", f"pass{k}", "heldout_pass1", f"heldout_pass{k}", "entropy")
        return {r: dict(zip(names, (v[at[r]] for v in values))) for r in runs}

    histories: list[list[dict[str, Any]]] = [[] for _ in range(R)]
    step_wall: list[list[float]] = [[] for _ in range(R)]
    results: list[TrainResult | None] = [None] * R
    ev = evaluate(range(R))
    for r in range(R):
        row0: dict[str, Any] = {"method": methods[r], "seed": seeds[r], "step": 0, "problem_set_seed": ps_seeds[r],
                                **ev[r], **initial_record(estimators[r]),
                                "pivot_before_error": nan, "pivot_oracle_success": nan}
        histories[r].append(row0)
        if on_step:
            on_step(r, row0)

    def finish(r: int) -> None:
        own = sets[r]
        results[r] = TrainResult(history=histories[r], wall_time_s=time.perf_counter() - t_start,
                                 step_wall_time_s=step_wall[r], ledger=ledgers[r], problems=own, policy=S.policy,
                                 estimator=estimators[r], problem_set_seed=ps_seeds[r],
                                 problem_set_pinned=specs[r].pinned)
        if on_finish:
            on_finish(r, results[r])

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=max(c.steps for c in configs), desc=methods[0] or "train", unit="step", leave=False)
    active = list(range(R))
    step = 0
    while active:
        step += 1
        live = [r for r in active
                if step <= configs[r].steps and budget_left(ledgers[r], configs[r].budget, configs[r].budget_unit)]
        for r in active:
            if r not in live:
                finish(r)
        active = live
        if not live:
            break
        t0 = time.perf_counter()
        if len(live) <= COMPACT_FRACTION * len(S.runs):
            S.compact(live)
        prompts: list[int] = []
        for r in live:
            # training problems only (indices < n_train): held-out problems are never in a batch
            base = S.slot_of[r] * n
            prompts += [base + int(p) for p in np.sort(batch_rngs[r].choice(n_train, size=n_batch, replace=False))]
        replica = np.repeat(np.arange(len(live)), n_batch)
        W = S.table  # [R·n, T+1, 2] exact values under the sampling policy (evaluated after the last update)
        rs = explore_replicas(S.backend, prompts, replica, algo, [estimators[r] for r in live],
                              [core_rngs[r] for r in live], [ledgers[r] for r in live])
        extra: list[dict[str, float]] = []
        for i, r in enumerate(live):
            res = rs.results[i]
            plan = res.plan
            cols = {"pivot_before_error": nan, "pivot_oracle_success": nan}
            if len(plan):
                traj = torch.from_numpy(plan.traj)
                plen = torch.from_numpy(plan.prefix_len)
                first_error = res.main.extras["first_error"][traj]  # [P]
                cols["pivot_before_error"] = float((plen <= first_error).double().mean())
                cols["pivot_oracle_success"] = float(prefix_success(W, res.main.extras, traj, plen).mean())
            if probes[r]:
                ctx = StepContext(step=step, W=W, estimator=estimators[r], algo=algo, spec=specs[r], problems=sets[r],
                                  policy=S.policy)
                for probe in probes[r]:
                    cols.update(probe(res, ctx))
            extra.append(cols)
        slot = torch.as_tensor([S.slot_of[r] for r in live], dtype=torch.long)
        rs.batch.replica = slot[rs.batch.replica]  # the runs' own parameter rows
        by_slot = update_replicas(S.backend, rs.batch, algo.loss, S.optimizer, S.params, len(S.runs),
                                  micro_batch_size=first.micro_batch_size, max_grad_norm=first.max_grad_norm)
        updates = {r: by_slot[S.slot_of[r]] for r in live}
        ev = evaluate(live)
        share = (time.perf_counter() - t0) / len(live)
        for i, r in enumerate(live):
            row = {"method": methods[r], "seed": seeds[r], "step": step, "problem_set_seed": ps_seeds[r], **ev[r],
                   **step_record(rs.results[i], updates[r], ledgers[r], estimators[r]), **extra[i]}
            histories[r].append(row)
            step_wall[r].append(share)
            if on_step:
                on_step(r, row)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return [res for res in results if res is not None]


COMPACT_FRACTION = 0.75
""":func:`train_replicas` drops the stopped runs from its tensors once the runs still training are at
most this share of those the tensors hold (a step's policy pass, oracle tables and update then
cost what the live runs need; each run's numbers are the same, as they are in any batch)."""


class _Slots:
    """The per-run state of :func:`train_replicas` that is stacked over runs: the problem sets'
    stack, the policy, its optimizer, the backend (with each run's own sampling generator) and
    the latest oracle table, for the runs ``runs`` (slot i holds run ``runs[i]``)."""

    def __init__(self, runs: list[int], sets: Sequence[ProblemSet], first: RunnerConfig,
                 configs: Sequence[RunnerConfig], generators: Sequence[torch.Generator], n_train: int) -> None:
        self._sets, self._first, self._configs, self._generators = sets, first, configs, generators
        self._n_train = n_train
        self._build(runs, None)

    def _build(self, runs: list[int], old: _Slots | None) -> None:
        self.runs = runs
        self.slot_of = {r: i for i, r in enumerate(runs)}
        sets = [self._sets[r] for r in runs]
        self.stacked = ProblemSet.stack(sets)  # slot i's problem p is i·n + p
        n = sets[0].n
        policy = TokenTreePolicy(sets, self._first.policy, self._first.feature_dim)
        params = [p for p in policy.parameters() if p.requires_grad]
        optimizer = make_optimizer(self._first.optimizer, params, [self._configs[r].lr for r in runs])
        if old is not None:  # carry every kept run's weights and optimizer state over, bit for bit
            keep = torch.as_tensor([old.slot_of[r] for r in runs], dtype=torch.long)
            with torch.no_grad():
                for p, q in zip(params, old.params):
                    p.copy_(q[keep])
            for st, prev in zip(getattr(optimizer, "state", []), getattr(old.optimizer, "state", [])):
                for key, value in prev.items():
                    st[key] = value[keep].clone()
            R_old = len(old.runs)
            self.table = old.table.view(R_old, n, *old.table.shape[1:])[keep].reshape(-1, *old.table.shape[1:])
        self.policy, self.params, self.optimizer = policy, params, optimizer
        self.backend = SimBackend(self.stacked, policy, [self._generators[r] for r in runs])
        step_masks = self.stacked.step_mask().numpy()  # [R·n, T] steps a chain visits
        self.train_mask = step_masks.reshape(len(runs), n, -1)[:, :self._n_train]  # [R, n_train, T]
        self.n_steps = self.train_mask.sum(axis=(1, 2))  # [R]

    def compact(self, live: list[int]) -> None:
        """Keep only the runs ``live`` (in that order)."""
        self._build(list(live), copy.copy(self))


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
