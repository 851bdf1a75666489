"""``deepgrpo study regime-map``: in which regime DEEP-GRPO wins, and which of its ingredients
does the work.

**Regimes** (the map's axes; a *regime* is one combination of the first three, a *cell* is a
regime read in one budget unit):

* ``spread``: how much the problems' difficulties differ (``TokenTreeSpec.heterogeneity`` h: 0,
  every problem has the same crux steps, the case where the position-only P̂(r) is exact; 1,
  independent cruxes per problem, the simulator's default);
* ``recovery``: how a derailed chain can recover (``fatal``, ``constant``, ``decay``; the
  settings of the depth-bias study and of the theory panel);
* ``learner``: policy class x optimizer (``tabular`` or shared ``features``; ``adam`` or ``sgd``,
  each tuned around :data:`sims.optim.DEFAULT_LR`; and ``skills/adam``, the policy in which
  learning transfers between problems through shared skills, on problem sets with skills,
  read first on held-out problems: :data:`TRANSFER_LEARNERS`);
* ``unit``: the budget unit the methods are compared in (``tokens`` or ``rollouts``).

**Methods** (:data:`METHODS`): GRPO at N = 4 ... 64 roots, the decomposition ladder
(:data:`LADDER`: best GRPO-N → root-only → random pivot → depth-only → DEEP-GRPO with the
position-only P̂ → state-aware P̂ → oracle pivot → oracle informative pivot, each rung adding one
ingredient), and the variants the paper's claims need (γ, λ, dispersed branching).

**Protocol** (DESIGN.md, :mod:`analysis.protocol`): every run stops once it has generated
``B`` tokens; since a rollout generates at most ``depth`` tokens, every run has then also spent
at least ``B // depth`` rollouts, the rollout budget (GRPO and root-only, which generate whole
chains, reach both at the same step; suffix-only branches reach the rollout budget earlier).
A run's values are read at each budget (linear interpolation of its curve), so one run serves
both units *with the same learning rate*. The learning rate of every (regime, method) is tuned
per unit on tuning seeds 1000+ (criterion: mean AUC of training pass@1 over [0, budget] in that
unit; grids extended by 2x past an end up to a limit), so a method may be evaluated at two
rates, one per unit. The *best GRPO-N* of a cell is the N with the best tuning criterion (chosen
on the tuning seeds, never on the evaluation seeds). Evaluation seeds 0..n-1 each draw their own
problem set; differences are paired over seeds with Holm-corrected 95 % intervals
(:mod:`analysis.stats`).

**Per cell**: the winner among GRPO-N and the ladder (highest mean pass@1 at the budget, with the
number of methods not significantly below it, Holm over the comparisons with it), DEEP-GRPO
minus the best GRPO-N and minus root-only (Holm over the two within the cell, and over every
cell of the unit map-wide), each ladder step, and the families of the paper's claims
(:data:`CLAIMS`).

**Headline** (:func:`headline_table`): the cells of :data:`HEADLINE_LEARNERS` (the shared-features
learners; the tabular one is a sanity check, for the reason given there), each read at its
headline readout (:data:`HEADLINE_SATURATION`), each unit tallied on its own, every comparison and
claim (b)-(e) also pooled over the regimes with the regime as block, with its minimum detectable
effect; claim (a) as the paper states it, at equal steps (:func:`saturation_table`).

Outputs in ``OUT/regime-map/`` (atomic writes; resumable like every sweep): ``tuning/`` (the
tuning runs), ``tuned_lr.csv`` (per regime, method, unit and rate: criterion, chosen, edge),
``runs.csv`` (evaluation step histories), ``per_run.csv`` (one row per run and unit: the values at
the budget; every later table, figure and finding is computed from it), ``map.csv`` (one row per
cell and method: mean and 95 % CI over seeds), ``effects.csv`` (one row per cell and comparison),
``cells.csv`` (one row per cell: winner, best GRPO-N, the two headline differences),
``readouts.csv`` (the headline and ladder comparisons under every readout: pass@1 at 1/8, 1/4, 1/2
and the whole budget, its AUC, the budget to halfway; and each cell's headline readout by a
saturation rule fixed before comparing), ``heatmap.png``, ``waterfall_tokens.png``,
``waterfall_rollouts.png``, ``theory/`` (the exact oracle curves of every spread x recovery on the
map's problem sets) and ``study.json``. ``deepgrpo report --results OUT`` adds the map and the
paper's claims to ``REPORT.md``; ``--readme README.md`` rewrites the README's simulator results
from it.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.protocol import (
    TUNING_SEED_BASE,
    RunCurves,
    budget_table,
    choose_rates,
    extend_grids,
    tuning_cells,
    with_protocol,
)
from analysis.stats import (
    ALPHA,
    EQUIVALENCE_MARGIN,
    POWER,
    Comparison,
    compare_arrays,
    holm,
    mean_ci,
    minimum_detectable_effect,
)
from analysis.sweep import Cell, run_sweep
from analysis.theory import HETEROGENEITY, RECOVERY_MODELS
from deepgrpo.config import ConfigError, check_range
from deepgrpo.flags import OneLineParser, OptionSet
from deepgrpo.ledger import BUDGET_UNITS
from deepgrpo.records import Interrupted, atomic_write, versions, write_csv_atomic, write_json_atomic, write_text_atomic
from sims.spec import SKILLS_DEFAULTS

STUDY = "regime-map"

# ------------------------------------------------------------------------------------------
# the axes

SPREADS: dict[str, dict[str, Any]] = {f"h={h:g}": {"heterogeneity": float(h)} for h in HETEROGENEITY}
"""Spread of per-problem difficulty -> TokenTreeSpec overrides."""
RECOVERY: dict[str, dict[str, Any]] = dict(RECOVERY_MODELS)
"""Recovery model -> TokenTreeSpec overrides (the theory panel's)."""
LEARNERS: dict[str, dict[str, str]] = {**{f"{p}/{o}": {"policy": p, "optimizer": o}
                                          for p in ("tabular", "features") for o in ("adam", "sgd")},
                                       "skills/adam": {"policy": "skills", "optimizer": "adam"}}
"""Policy class x optimizer -> RunnerConfig overrides."""
LEARNER_SPECS: dict[str, dict[str, Any]] = {"skills/adam": dict(SKILLS_DEFAULTS)}
"""Learner -> TokenTreeSpec overrides it needs: the skills policy learns through the skills its
problems share (:data:`sims.spec.SKILLS_DEFAULTS`; the other learners' problem sets have none)."""
TRANSFER_LEARNERS = ("skills/adam",)
"""The learners in which learning transfers between problems (the skills policy): their primary
readout is held-out exact pass@1 (problems never trained on), reported on its own
(:func:`transfer_lines`); the features policy can only interfere, the tabular one shares nothing."""
REGIME = ("spread", "recovery", "learner")
"""The columns that name a regime."""
CELL = (*REGIME, "unit")
"""The columns that name a cell of the map."""


@dataclass(frozen=True)
class MapMethod:
    """One method of the map: ``name`` (display label), ``method`` (a name of
    :data:`deepgrpo.methods.METHODS`), ``algo`` (its overrides), ``family`` (``grpo``, ``ladder``,
    ``gamma``, ``lambda`` or ``dispersed``) and what it adds (``what``)."""

    name: str
    method: str
    algo: dict[str, Any]
    family: str
    what: str


GRPO_NS = (4, 8, 16, 32, 64)
"""Root group sizes of GRPO; the best of them (on tuning seeds) is the ladder's first rung."""
DEEP = "deep-grpo"
ROOT_ONLY = "root-only"
BEST_GRPO = "best GRPO-N"
LADDER: dict[str, str] = {
    BEST_GRPO: "root sampling only, at the N that tuned best",
    ROOT_ONLY: "extra samples on failed prompts (K root samples per failed chain, own group)",
    "deep-random": "branching from a random pivot (suffix-only cost, masked prefix, sibling baseline)",
    "deep-depth-only": "pivots by depth alone (r^γ)",
    DEEP: "the position-only P̂ (DEEP-GRPO)",
    "deep-state": "a state-aware P̂",
    "oracle-pivot": "the exact chance q that one continuation succeeds in place of P̂ in the paper's utility q·r^γ "
                    "(simulator truth)",
    "oracle-informative": "the pivot most likely to give a mixed K-group, 1 - q^K - (1 - q)^K, per generated token "
                          "(per rollout in the rollouts unit; simulator truth)",
}
"""The decomposition ladder (DESIGN.md): rung -> the ingredient it adds to the rung before."""

METHODS: tuple[MapMethod, ...] = (
    *(MapMethod(f"grpo N={n}", "grpo", {"G": n}, "grpo", f"GRPO with N = {n} roots") for n in GRPO_NS),
    *(MapMethod(name, name, {}, "ladder", what) for name, what in LADDER.items() if name != BEST_GRPO),
    *(MapMethod(f"deep γ={g:g}", DEEP, {"gamma": g}, "gamma", f"DEEP-GRPO with depth exponent γ = {g:g}")
      for g in (0.0, 1.0, 4.0)),
    *(MapMethod(f"deep λ={x:g}", DEEP, {"lam": x}, "lambda", f"DEEP-GRPO with aux weight λ = {x:g}")
      for x in (0.0, 0.5, 2.0)),
    MapMethod("uniform M=2", "tree-uniform", {"n_cut_points": 2}, "dispersed",
              "K = 8 continuations split over 2 uniform cut points (group advantages)"),
    MapMethod("TreeRL M=2", "tree-surprisal", {"n_cut_points": 2, "tree": True}, "dispersed",
              "K = 8 continuations split over 2 max-surprisal cut points with TreeRL's tree advantages"),
    MapMethod("oracle-informative per rollout", "oracle-informative", {"informative_cost": "rollouts"}, "per-unit",
              "the pivot most likely to give a mixed K-group per rollout (simulator truth)"),
    MapMethod("learned-informative", "learned-informative", {}, "selector",
              "the pivot most likely to give a mixed K-group per generated token, with q estimated online from what "
              "an LLM backend also observes (no simulator truth): the learned selector"),
)
"""Every method of every regime (DEEP-GRPO's defaults: G = K = 8, γ = 2, λ = 1)."""
PER_UNIT: dict[str, tuple[str, str]] = {"oracle-informative": ("rollouts", "oracle-informative per rollout")}
"""Rungs read from another method in one unit: ``{rung: (unit, method)}``. The oracle informative
pivot maximises the chance of a mixed K-group per unit of the budget: per generated token in the
tokens unit (``informative_cost = tokens``), per rollout in the rollouts unit (``informative_cost =
rollouts``, every pivot costs K rollouts), so in the rollouts unit the rung is read from the
per-rollout runs (:func:`per_run_table` renames them; they are tuned like every method)."""
METHOD_NAMES = tuple(m.name for m in METHODS)
WINNER_POOL = tuple(m.name for m in METHODS if m.family in ("grpo", "ladder"))
"""The methods a cell's winner is chosen from: GRPO at every N and the ladder."""


@dataclass(frozen=True)
class Claim:
    """A claim of the paper tested in every cell: ``reference`` minus each of ``others`` (one
    Holm family per cell). ``rule``: ``beats`` (holds when ``reference`` is higher than every
    other) or ``saturates`` (holds when ``reference`` is lower than or equivalent to the other)."""

    key: str
    title: str
    paper: str
    reference: str
    others: tuple[str, ...]
    rule: str = "beats"


CLAIMS: tuple[Claim, ...] = (
    Claim("a", "root saturation", "more roots per prompt stop paying: GRPO N = 64 is no better than N = 32",
          "grpo N=64", ("grpo N=32",), "saturates"),
    Claim("b", "DEEP-GRPO beats GRPO N = 64 at equal budget", "DEEP-GRPO (G = K = 8) beats GRPO with N = 64",
          DEEP, ("grpo N=64",)),
    Claim("c", "a γ sweet spot near 2", "γ = 2 beats both no depth bias (γ = 0) and a stronger one (γ = 4)",
          DEEP, ("deep γ=0", "deep γ=4")),
    Claim("d", "dense beats dispersed branching", "K continuations at one pivot beat K split over M = 2 points "
          "(uniform, and TreeRL-like max-surprisal with tree advantages)", DEEP, ("uniform M=2", "TreeRL M=2")),
    Claim("e", "λ = 1 best", "λ = 1 beats λ = 0 (no aux stream), 0.5 and 2", DEEP, ("deep λ=0", "deep λ=0.5",
                                                                                       "deep λ=2")),
)
"""The paper's claims (arXiv 2602.14169): (a) root saturation, (b) DEEP-GRPO beats GRPO N = 64 at
equal budget, (c) γ ≈ 2, (d) dense over dispersed, (e) λ = 1."""
VERDICTS = ("holds", "partly", "fails", "inconclusive")
SATURATION_NS = (8, 16, 32, 64)
"""Claim (a) as the paper states it: the increments of pass@1 from N = 8 to 16, 32 and 64 roots at
equal steps are positive and shrink."""
CEILING = 0.95
"""A cell is *at the ceiling* when every method of GRPO-N and the ladder ends with mean pass@1 at
least this (the report lists them: no method can show a gain there)."""
READOUT_FRACTIONS: dict[str, float] = {"pass1_at_1_8": 1 / 8, "pass1_at_1_4": 1 / 4, "pass1_at_1_2": 1 / 2}
"""Earlier readouts of training exact pass@1: per-run columns at these fractions of the cell's
budget (``pass1_at`` is the whole budget)."""
READOUTS: dict[str, str] = {"pass1_at_1_8": "1/8 budget", "pass1_at_1_4": "1/4 budget",
                            "pass1_at_1_2": "1/2 budget", "pass1_at": "budget", "pass1_auc": "AUC",
                            "budget_to_half": "budget to halfway"}
"""Every readout the verdicts are shown under (column -> label): training exact pass@1 at four
budgets, its AUC over [0, budget], and the budget needed to reach a threshold."""
LOWER_IS_BETTER = frozenset({"budget_to_half"})
"""Readouts where a lower value is the better one (the comparisons' ``higher`` means slower)."""
HEADLINE_LEARNERS = ("features/adam", "features/sgd")
"""The learners whose cells carry the map's headline; the tabular learner is a sanity check. Its
policy has one logit per (state, token), so one update can lock a token in: its tuned rates pile up
at the top of the grid (the tuning criterion is flat from 16x to 128x the default), most of its
runs end near pass@1 = 1, and it searches rather than learns. A per-step bound on its policy change
would not fix that: every rate above the bound would then tie, so the chosen rate would still sit
at the grid's edge and mean only "the bound". Its cells stay in every table and figure."""
HEADLINE_CLAIMS = ("b", "c", "d", "e")
"""The claims tested at every readout (claim (a) is root saturation, tested at equal steps)."""
HEADLINE_SATURATION = 0.9
"""The rule for a cell's headline readout, fixed before any method is compared: the largest of
the four budgets (1/8, 1/4, 1/2, 1) at which the best method's mean training pass@1 (best of
GRPO-N and the ladder) is still below this, so the best method is not saturated there; the
smallest budget if it is saturated at all four."""


def _claim_verdict_why(rule: str, verdicts: Sequence[str]) -> tuple[str, str]:
    """(:func:`claim_verdict`, and when it fails ``reversed`` if a comparison goes the other way,
    else ``no difference``; empty otherwise)."""
    verdict = claim_verdict(rule, verdicts)
    if verdict != "fails":
        return verdict, ""
    return verdict, "reversed" if ("higher" if rule == "saturates" else "lower") in verdicts else "no difference"


def claim_verdict(rule: str, verdicts: Sequence[str]) -> str:
    """The verdict of a claim in one cell from its comparisons' verdicts (``higher``, ``lower``,
    ``equivalent``, ``inconclusive``; :attr:`analysis.stats.Comparison.verdict`).

    ``saturates``: holds if the one comparison is lower or equivalent, fails if higher.
    ``beats``: holds if every comparison is higher; fails if any is lower or all are
    equivalent; partly if none is lower and some but not all are higher; else inconclusive.
    """
    v = list(verdicts)
    if not v:
        return "inconclusive"
    if rule == "saturates":
        if any(x == "higher" for x in v):
            return "fails"
        return "holds" if all(x in ("lower", "equivalent") for x in v) else "inconclusive"
    if rule != "beats":
        raise ValueError(f"rule = {rule!r} is invalid: expected 'beats' or 'saturates'")
    if all(x == "higher" for x in v):
        return "holds"
    if any(x == "lower" for x in v) or all(x == "equivalent" for x in v):
        return "fails"
    return "partly" if any(x == "higher" for x in v) else "inconclusive"


# ------------------------------------------------------------------------------------------
# sizes


@dataclass(frozen=True)
class MapSize:
    """How big a regime map is: ``spec`` (TokenTreeSpec overrides), ``batch_problems``,
    ``tokens`` (the token budget of every run; the rollout budget is ``tokens // depth``),
    ``max_steps`` (a cap), ``lr_factors`` (the tuning grid as multiples of the optimizer's
    :data:`~sims.optim.DEFAULT_LR`), ``tuning_seeds``, ``max_extensions`` (doublings past
    either end of a grid) and ``seeds`` (evaluation seeds unless ``--seeds`` says otherwise)."""

    spec: dict[str, Any]
    batch_problems: int
    tokens: int
    max_steps: int
    lr_factors: tuple[float, ...]
    tuning_seeds: int
    max_extensions: int
    seeds: int


FULL = MapSize(spec={}, batch_problems=16, tokens=100_000, max_steps=2000, lr_factors=(1.0, 4.0, 16.0),
               tuning_seeds=3, max_extensions=3, seeds=20)
"""The default spec (32 training and 16 held-out problems of 12 steps), 16 problems per step,
100,000 tokens (8,333 rollouts) per run, three rates 4x apart (1x, 4x, 16x the optimizer's
default), extended by 2x past an end up to three times (to 128x), on three tuning seeds (the rate
and the best GRPO-N are chosen on their mean), and 20 evaluation seeds: with 5, the minimum
detectable effect of DEEP-GRPO minus the best GRPO-N was about 0.1 pass@1 (median over cells),
above the effects that matter."""
QUICK = MapSize(spec={"n_problems": 8, "n_heldout": 4}, batch_problems=4, tokens=2_000, max_steps=200,
                lr_factors=(1.0, 4.0), tuning_seeds=1, max_extensions=0, seeds=2)
"""``--quick`` (the tests' size): 8 problems, 4 per step, 2,000 tokens, two rates on one tuning seed,
two evaluation seeds."""
SIZES = {"full": FULL, "quick": QUICK}


def budgets(size: MapSize) -> dict[str, int]:
    """``{unit: budget}``: the size's tokens, and as many rollouts as whole chains of the
    longest length fit in them (every run reaches both)."""
    from sims.spec import TokenTreeSpec
    depth = TokenTreeSpec(**size.spec).depth
    return {"tokens": int(size.tokens), "rollouts": int(size.tokens // depth)}


# ------------------------------------------------------------------------------------------
# the grid


def regimes() -> list[dict[str, str]]:
    """Every regime as ``{"spread": ..., "recovery": ..., "learner": ...}`` in map order."""
    return [{"spread": s, "recovery": r, "learner": learner} for s in SPREADS for r in RECOVERY for learner in LEARNERS]


def _variant(regime: dict[str, str], name: str) -> str:
    return f"{regime['spread']} | {regime['recovery']} | {regime['learner']} | {name}"


def base_cells(size: MapSize) -> list[Cell]:
    """One cell per (regime, method) before the protocol (seed 0; no rate or budget yet)."""
    cells = []
    for reg in regimes():
        spec = {**size.spec, **SPREADS[reg["spread"]], **RECOVERY[reg["recovery"]],
                **LEARNER_SPECS.get(reg["learner"], {})}
        runner = {"batch_problems": size.batch_problems, **LEARNERS[reg["learner"]]}
        for m in METHODS:
            cells.append(Cell(STUDY, _variant(reg, m.name), 0,
                              {"method": m.method, "algo": dict(m.algo), "spec": spec, "runner": runner, "probes": []},
                              {**reg, "name": m.name, "family": m.family}))
    return cells


def _optimizer(cell: Cell) -> str:
    return LEARNERS[cell.columns["learner"]]["optimizer"]


# ------------------------------------------------------------------------------------------
# tables


def budget_to_threshold(curves: RunCurves, unit: str, budget: float, share: float = 0.5) -> np.ndarray:
    """``[R]`` the fraction of ``budget`` (in ``unit``) each run spent before its training exact
    pass@1 first reached the threshold ``start + share · (1 - start)`` (halfway from its own
    start to 1 by default; its start is the same for every method on a seed, so the comparison is
    paired): the spending is interpolated linearly between the last step below the threshold and
    the first at or above it. A run that never reaches it within the budget counts as 1 (the
    whole budget): the readout is capped, so a difference involving such runs is a lower bound on
    the real one."""
    spend = curves.column(unit).astype(np.float64)
    value = curves.column("pass1").astype(np.float64)
    start = curves.first("pass1").to_numpy(np.float64)
    goal = start + share * (1.0 - start)  # [R]
    hit = (value >= goal[curves.run]) & (spend <= budget)
    first = curves.first_where(hit)
    out = np.ones(curves.n_runs)
    ok = first >= 0
    i = first[ok]
    prev = np.maximum(i - 1, curves.starts[ok])  # the step before (the run's first step: itself)
    x0, x1, y0, y1 = spend[prev], spend[i], value[prev], value[i]
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.where(y1 > y0, (goal[ok] - y0) / (y1 - y0), 1.0)
    out[ok] = (x0 + np.clip(w, 0.0, 1.0) * (x1 - x0)) / budget
    return out


def per_run_table(runs: pd.DataFrame, tuned: pd.DataFrame, ends: dict[str, int]) -> pd.DataFrame:
    """One row per (evaluation run, unit) at that unit's chosen rate: the cell and method
    columns, ``seed``, ``problem_set_seed``, ``lr``, ``lr_edge``, ``budget`` (the unit's),
    ``reached`` (the run spent it), ``steps`` (steps taken to reach it: the first step at which the
    run had spent at least the budget), ``pass1_start``, ``pass1_at`` / ``pass1_auc`` (training
    exact pass@1 at the budget / mean over [0, budget]), ``heldout_pass1_start`` /
    ``heldout_pass1_at`` / ``heldout_pass1_auc`` (the same on the held-out problems), the earlier
    readouts ``pass1_at_1_8`` / ``pass1_at_1_4`` / ``pass1_at_1_2`` (training exact pass@1 at that
    fraction of the budget) and ``heldout_pass1_at_1_8`` ... (the same on the held-out problems),
    ``budget_to_half`` (:func:`budget_to_threshold`) and ``pivot_oracle_success`` (mean exact
    P(success | branch prefix) over the run's steps; NaN for root sampling). Every run is read in
    one vectorised pass (:class:`~analysis.protocol.RunCurves`)."""
    keep = (*REGIME, "name", "family")
    curves = RunCurves(runs, ["variant", "lr", "seed"])
    table = budget_table(runs, keep=keep, ends={u: float(e) for u, e in ends.items()}, curves=curves)
    # per run, aligned with the rows of `table`
    problem_set_seed = np.array([int(v) for v in curves.first("problem_set_seed")], dtype=object)
    pivot_oracle_success = curves.mean("pivot_oracle_success")
    heldout_start = (curves.first("heldout_pass1").to_numpy(np.float64) if "heldout_pass1" in runs
                     else np.full(curves.n_runs, np.nan))
    step = curves.column("step")
    steps_to = {}
    for u in BUDGET_UNITS:
        first = curves.first_where(curves.column(u) >= ends[u] - 1e-9)
        steps_to[u] = np.array([float(step[i]) if i >= 0 else float("nan") for i in first])
    early = {(u, col): curves.value_and_auc(u, "pass1", frac * ends[u])[0]
             for u in BUDGET_UNITS for col, frac in READOUT_FRACTIONS.items()}
    if "heldout_pass1" in runs:
        early.update({(u, f"heldout_{col}"): curves.value_and_auc(u, "heldout_pass1", frac * ends[u])[0]
                      for u in BUDGET_UNITS for col, frac in READOUT_FRACTIONS.items()})
    to_half = {u: budget_to_threshold(curves, u, ends[u]) for u in BUDGET_UNITS}
    chosen = tuned[tuned.chosen.astype(bool)]
    frames = []
    for u in BUDGET_UNITS:
        rate = chosen[chosen.unit == u].set_index("variant")[["lr", "edge"]]
        mask = np.isclose(table.lr.to_numpy(), rate.lr.reindex(table.variant).to_numpy(), rtol=1e-9, atol=0)
        sel = table[mask]
        f = pd.DataFrame({
            **{c: sel[c].to_numpy() for c in ("variant", *keep)}, "unit": u, "seed": sel.seed.to_numpy(),
            "lr": sel.lr.to_numpy(), "lr_edge": rate.edge.reindex(sel.variant).astype(bool).to_numpy(),
            "budget": ends[u], "reached": (sel[u] >= ends[u]).to_numpy(), "pass1_start": sel.pass1_start.to_numpy(),
            "pass1_at": sel[f"pass1_at_{u}"].to_numpy(), "pass1_auc": sel[f"pass1_auc_{u}"].to_numpy()})
        if f"heldout_pass1_at_{u}" in sel:
            f["heldout_pass1_start"] = heldout_start[mask]
            f["heldout_pass1_at"] = sel[f"heldout_pass1_at_{u}"].to_numpy()
            f["heldout_pass1_auc"] = sel[f"heldout_pass1_auc_{u}"].to_numpy()
        for col in (*READOUT_FRACTIONS, *(f"heldout_{c}" for c in READOUT_FRACTIONS)):
            if (u, col) in early:
                f[col] = early[(u, col)][mask]
        f["budget_to_half"] = to_half[u][mask]
        f["problem_set_seed"] = problem_set_seed[mask].tolist()
        f["pivot_oracle_success"] = pivot_oracle_success[mask].tolist()
        f["steps"] = steps_to[u][mask].tolist()
        for rung, (unit, alt) in PER_UNIT.items():  # the rung's runs in this unit (see PER_UNIT)
            if u == unit:
                f = f[f.name != rung].copy()
                f.loc[f.name == alt, ["name", "family"]] = (rung, "ladder")
            else:
                f = f[f.name != alt]
        frames.append(f)
    out = pd.concat(frames, ignore_index=True)
    return out.sort_values([*CELL, "name", "seed"], key=_map_order, kind="stable").reset_index(drop=True)


def _map_order(col: pd.Series) -> pd.Series:
    """Sort key: the map's own order of every axis and of the methods."""
    orders = {"spread": list(SPREADS), "recovery": list(RECOVERY), "learner": list(LEARNERS),
              "unit": list(BUDGET_UNITS), "name": list(METHOD_NAMES)}
    if col.name in orders:
        return col.map({v: i for i, v in enumerate(orders[col.name])})
    return col


def _group_rows(frame: pd.DataFrame, cols: Sequence[str]) -> list[np.ndarray]:
    """Row positions of every group of ``cols`` in ``frame``: groups in order of first appearance
    (``groupby(sort=False)``'s), rows in frame order. The tables and figures loop over these
    position arrays on NumPy columns: filtering a frame per cell costs about a millisecond each."""
    if not len(frame):
        return []
    codes = frame.groupby(list(cols), sort=False).ngroup().to_numpy()
    order = np.argsort(codes, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(codes[order])) + 1)


def _columns(frame: pd.DataFrame, cols: Sequence[str]) -> dict[str, np.ndarray]:
    return {c: frame[c].to_numpy() for c in cols}


def _mean(x: np.ndarray) -> float:
    """``pandas.Series.mean`` of a float array (NaN skipped; NaN if none is left), bit for bit:
    the same sum of the non-NaN values divided by their count."""
    nan = np.isnan(x)
    n = int(x.size - nan.sum())
    return float((np.where(nan, 0.0, x) if n < x.size else x).sum() / n) if n else float("nan")


def _best_n(tuned: pd.DataFrame) -> dict[tuple, int]:
    """``{cell key (CELL values): best N}`` (:func:`best_grpo`)."""
    t = tuned[tuned.chosen.astype(bool) & (tuned.family == "grpo")]
    crit, names, keys = t.criterion.to_numpy(np.float64), t.name.to_numpy(), _columns(t, CELL)
    out = {}
    for idx in _group_rows(t, CELL):
        key = tuple(keys[c][idx[0]] for c in CELL)
        if np.isnan(crit[idx]).all():
            raise ValueError(f"cell {dict(zip(CELL, key))}: no GRPO run has a finite tuning criterion")
        out[key] = int(str(names[idx[np.nanargmax(crit[idx])]]).split("=")[1])  # the first of equal maxima
    return out


def best_grpo(tuned: pd.DataFrame) -> pd.DataFrame:
    """Per cell (regime x unit), the GRPO N with the best tuning criterion at its chosen rate
    (``best_N``; chosen on the tuning seeds)."""
    return pd.DataFrame([{**dict(zip(CELL, key)), "best_N": n} for key, n in _best_n(tuned).items()])


_NAME_INDEX = {n: i for i, n in enumerate(METHOD_NAMES)}


def _wide(seed: np.ndarray, name: np.ndarray, value: np.ndarray) -> np.ndarray:
    """``[methods, seeds]``: ``value`` by method (:data:`METHOD_NAMES` order) and seed (ascending);
    NaN where a method lacks a seed (one cell's ``pivot(index="seed", columns="name")``)."""
    if len(set(zip(seed.tolist(), name.tolist()))) < len(seed):
        raise ValueError("a cell has two runs of one method with the same seed")
    seeds, col = np.unique(seed, return_inverse=True)
    row = np.array([_NAME_INDEX.get(n, -1) for n in name], dtype=np.intp)
    out = np.full((len(METHOD_NAMES), seeds.size), np.nan)
    keep = row >= 0
    out[row[keep], col[keep]] = value[keep]
    return out


def effects_table(per: pd.DataFrame, tuned: pd.DataFrame, metric: str = "pass1_at") -> pd.DataFrame:
    """One row per (cell, comparison) on ``metric``: ``family`` (``headline``: DEEP-GRPO minus the
    best GRPO-N and minus root-only; ``ladder``: each rung minus the one below; ``winner``: the
    cell's top method minus each other of :data:`WINNER_POOL`; ``claim a`` ... ``claim e``),
    ``comparison``, ``reference``, ``other``, ``diff``, ``low``, ``high`` (the Holm interval
    within the cell's family), ``confidence``, ``p``, ``p_holm``, ``p_tost_holm``, ``verdict``,
    ``n`` (paired seeds), ``mde`` (the minimum detectable effect at 80 % power at Holm's strictest level
    in the family, :func:`~analysis.stats.minimum_detectable_effect`). Headline rows also get
    ``p_holm_map`` and ``verdict_map``: Holm over every headline comparison of the unit (the whole map)."""
    best = _best_n(tuned)
    keys, seed, names = _columns(per, CELL), per.seed.to_numpy(), per.name.to_numpy()
    value = per[metric].to_numpy(np.float64)
    rows = []
    for idx in _group_rows(per, CELL):
        cell = {c: keys[c][idx[0]] for c in CELL}
        n_best = best[tuple(cell.values())]
        wide = _wide(seed[idx], names[idx], value[idx])  # [M, seeds]
        cols = {name: wide[i] for i, name in enumerate(METHOD_NAMES)}
        cols[BEST_GRPO] = cols[f"grpo N={n_best}"]
        fams: list[tuple[str, list[tuple[str, str, str]]]] = [
            ("headline", [(f"{DEEP} minus {BEST_GRPO} (N={n_best})", DEEP, BEST_GRPO),
                          (f"{DEEP} minus {ROOT_ONLY}", DEEP, ROOT_ONLY)]),
            ("ladder", [(f"{b} minus {a}", b, a) for a, b in zip(LADDER, list(LADDER)[1:])])]
        means = {n: float(np.nanmean(cols[n])) if np.isfinite(cols[n]).any() else -np.inf for n in WINNER_POOL}
        top = max(means, key=lambda n: (means[n], -WINNER_POOL.index(n)))  # ties: the earlier method
        fams.append(("winner", [(f"{top} minus {o}", top, o) for o in WINNER_POOL if o != top]))
        fams += [(f"claim {c.key}", [(f"{c.reference} minus {o}", c.reference, o) for o in c.others]) for c in CLAIMS]
        for family, comps in fams:
            res = compare_arrays([(name, cols[a], cols[b]) for name, a, b in comps])
            for (name, a, b), r in zip(comps, res):
                rows.append({**cell, "metric": metric, "family": family, "comparison": name,
                             "reference": f"grpo N={n_best}" if a == BEST_GRPO else a,
                             "other": f"grpo N={n_best}" if b == BEST_GRPO else b, **_comparison_row(r),
                             "mde": minimum_detectable_effect(cols[a], cols[b], tests=len(comps))})
    out = pd.DataFrame(rows)
    out["p_holm_map"] = np.nan
    out["verdict_map"] = ""
    for u in BUDGET_UNITS:
        sel = (out.family == "headline") & (out.unit == u)
        adj = holm(out.loc[sel, "p"].to_numpy())
        out.loc[sel, "p_holm_map"] = adj
        out.loc[sel, "verdict_map"] = [("higher" if d > 0 else "lower") if q < ALPHA else "not significant"
                                       for d, q in zip(out.loc[sel, "diff"], adj)]
    return out


def _comparison_row(r: Comparison) -> dict[str, Any]:
    return {"diff": r.diff.mean, "low": r.diff.low, "high": r.diff.high, "confidence": r.diff.confidence,
            "p": r.p, "p_holm": r.p_holm, "p_tost_holm": r.p_tost_holm, "verdict": r.verdict, "n": r.diff.n}


def map_table(per: pd.DataFrame) -> pd.DataFrame:
    """One row per (cell, method): the cell's columns, ``name``, ``family``, ``lr`` (chosen for
    the unit), ``lr_edge``, ``budget``, ``seeds``, ``steps`` (mean steps to the budget), and
    mean with 95 % t-interval over seeds (``*_low``, ``*_high``) of training and held-out
    pass@1 at the budget, of the training AUC and of every other readout of :data:`READOUTS`."""
    rows = []
    values = [v for v in ("pass1_at", "heldout_pass1_at", "pass1_auc", *READOUT_FRACTIONS, "budget_to_half")
              if v in per]
    by = [*CELL, "name"]
    col = _columns(per, (*by, "family", "lr", "lr_edge", "budget", "seed"))
    steps = per.steps.to_numpy(np.float64)
    vals = {v: per[v].to_numpy(np.float64) for v in values}
    for idx in _group_rows(per, by):
        i = idx[0]
        seeds = col["seed"][idx]
        row = {**{c: col[c][i] for c in by}, "family": col["family"][i], "lr": float(col["lr"][i]),
               "lr_edge": bool(col["lr_edge"][i]), "budget": int(col["budget"][i]),
               "seeds": int(pd.unique(seeds[pd.notna(seeds)]).size), "steps": _mean(steps[idx])}
        for v in values:
            e = mean_ci(vals[v][idx])
            row.update({v: e.mean, f"{v}_low": e.low, f"{v}_high": e.high})
        rows.append(row)
    return pd.DataFrame(rows)


def cells_table(per: pd.DataFrame, effects: pd.DataFrame, tuned: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: the winner (highest mean pass@1 at the budget among
    :data:`WINNER_POOL`) and ``tied`` (other methods not significantly below it, Holm), its mean,
    ``best_N``, and DEEP-GRPO minus the best GRPO-N and minus root-only (difference, Holm interval
    within the cell, verdict, map-wide verdict, and ``*_material``: significant and at least the
    equivalence margin in size)."""
    best = _best_n(tuned)
    e = effects[effects.metric == "pass1_at"]
    ecol = _columns(e, (*CELL, "family", "reference", "other", "diff", "low", "high", "verdict", "verdict_map"))
    by_cell = {tuple(ecol[c][idx[0]] for c in CELL): idx for idx in _group_rows(e, CELL)}
    keys, budget, names = _columns(per, CELL), per.budget.to_numpy(), per.name.to_numpy()
    pass1 = per.pass1_at.to_numpy(np.float64)
    rows = []
    for idx in _group_rows(per, CELL):
        key = tuple(keys[c][idx[0]] for c in CELL)
        here = by_cell.get(key, np.zeros(0, dtype=np.intp))  # this cell's rows of `e`, in order
        fam = ecol["family"][here]
        win = here[fam == "winner"]
        top = str(ecol["reference"][win[0]]) if len(win) else ""
        row = {**dict(zip(CELL, key)), "budget": int(budget[idx[0]]), "winner": top,
               "winner_pass1": _mean(pass1[idx][names[idx] == top]) if top else np.nan,
               "tied": int((ecol["verdict"][win] != "higher").sum()), "best_N": int(best[key])}
        for tag, other in (("best_grpo", "grpo N="), ("root_only", ROOT_ONLY)):
            h = here[(fam == "headline") & np.array([str(o).startswith(other) for o in ecol["other"][here]],
                                                    dtype=bool)][0]
            diff, verdict = ecol["diff"][h], ecol["verdict"][h]
            row.update({f"deep_minus_{tag}": diff, f"deep_minus_{tag}_low": ecol["low"][h],
                        f"deep_minus_{tag}_high": ecol["high"][h], f"deep_minus_{tag}_verdict": verdict,
                        f"deep_minus_{tag}_map": ecol["verdict_map"][h],
                        f"deep_minus_{tag}_material": verdict in ("higher", "lower")
                        and abs(diff) >= EQUIVALENCE_MARGIN})
        rows.append(row)
    return pd.DataFrame(rows)


def headline_readouts(per: pd.DataFrame) -> dict[tuple, str]:
    """``{cell: readout column}``: each cell's headline readout by the :data:`HEADLINE_SATURATION`
    rule (decided from the best method's mean pass@1 alone, before any comparison)."""
    budgets = [b for b in (*READOUT_FRACTIONS, "pass1_at") if b in per]  # in increasing budget (a map
    # written before the earlier readouts existed has only the whole budget)
    pool = per[per.name.isin(WINNER_POOL)]
    means = pool.groupby([*CELL, "name"], sort=False)[budgets].mean()
    best = means.groupby(level=list(range(len(CELL))), sort=False).max()
    out = {}
    for key, row in zip(best.index, best.to_numpy(np.float64)):
        below = [b for b, v in zip(budgets, row) if v < HEADLINE_SATURATION]
        out[tuple(key)] = below[-1] if below else budgets[0]
    return out


def readouts_table(per: pd.DataFrame, tuned: pd.DataFrame,
                   effects: dict[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    """The headline, ladder and claim (:data:`HEADLINE_CLAIMS`) comparisons of :func:`effects_table`
    under every readout of :data:`READOUTS` present in ``per``: its rows with ``readout`` (the
    label), ``better`` (the verdict read in the readout's direction: ``better``/``worse`` for a
    significant difference, else the verdict), ``pair`` (the comparison without the cell's best N)
    and ``headline`` (this readout is the cell's :func:`headline_readouts`). ``effects``: tables of
    :func:`effects_table` already computed, by metric (the others are computed here)."""
    head = headline_readouts(per)
    frames = []
    for metric, label in READOUTS.items():
        if metric not in per:
            continue
        e = effects[metric] if effects is not None and metric in effects else effects_table(per, tuned, metric)
        e = e[e.family.isin(("headline", "ladder", *(f"claim {c}" for c in HEADLINE_CLAIMS)))].copy()
        good, bad = ("lower", "higher") if metric in LOWER_IS_BETTER else ("higher", "lower")
        e["readout"] = label
        e["pair"] = e.comparison.str.replace(r" \(N=\d+\)$", "", regex=True)  # the best N differs by cell
        e["better"] = e.verdict.map({good: "better", bad: "worse"}).fillna(e.verdict)
        e["headline"] = [head.get(k) == metric for k in zip(*(e[c] for c in CELL))]
        frames.append(e)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def equal_steps_table(runs: pd.DataFrame, tuned: pd.DataFrame) -> pd.DataFrame:
    """Claim (a) at equal steps: one row per (regime, seed, N of :data:`SATURATION_NS`) with
    ``steps`` (S: the fewest steps any of these GRPO runs of the regime and seed took to its token
    budget, normally N = 64's) and ``pass1_at_steps`` (training exact pass@1 after S steps), each
    N at the rate tuned for the token budget."""
    names = [f"grpo N={n}" for n in SATURATION_NS]
    chosen = tuned[tuned.chosen.astype(bool) & (tuned.unit == "tokens") & tuned.name.isin(names)]
    rate = chosen.set_index("variant").lr
    sel = runs[runs.name.isin(names)]
    sel = sel[np.isclose(sel.lr.to_numpy(np.float64), rate.reindex(sel.variant).to_numpy(np.float64), rtol=1e-9,
                         atol=0)]
    last = sel.groupby([*REGIME, "seed", "name"], sort=False).step.max()
    common = last.groupby(level=[*range(len(REGIME)), len(REGIME)], sort=False).min().rename("steps")  # [regime, seed]
    at = sel.merge(common.reset_index(), on=[*REGIME, "seed"])
    at = at[at.step == at.steps]
    out = at[[*REGIME, "seed", "name", "steps", "pass1"]].rename(columns={"pass1": "pass1_at_steps"})
    out.insert(len(REGIME) + 2, "N", out.name.str.split("=").str[1].astype(int))
    return out.sort_values([*REGIME, "seed", "N"], key=_map_order, kind="stable").reset_index(drop=True)


def saturation_table(eq: pd.DataFrame) -> pd.DataFrame:
    """Per regime, the increments of :func:`equal_steps_table`'s pass@1 from each N to the next
    (paired over seeds, Holm over the three): ``increment`` (e.g. ``16 - 8``), ``diff``, ``low``,
    ``high``, ``verdict``, ``mde``; and the regime's ``claim``: *holds* if every increment is
    significantly positive and each is smaller than the one before; *fails (reversed)* if one is
    significantly negative; *fails (not shrinking)* if every one is significantly positive but
    they do not shrink; *partly* if every mean increment is positive and they shrink, but not every
    one is significant; *inconclusive* otherwise."""
    rows = []
    for key, g in eq.groupby(list(REGIME), sort=False):
        wide = g.pivot_table(index="seed", columns="N", values="pass1_at_steps")
        pairs = [(f"{b} - {a}", wide[b].to_numpy(np.float64), wide[a].to_numpy(np.float64))
                 for a, b in zip(SATURATION_NS, SATURATION_NS[1:]) if a in wide and b in wide]
        res = compare_arrays(pairs)
        means = [r.diff.mean for r in res]
        verdicts = [r.verdict for r in res]
        shrinking = all(x > y for x, y in zip(means, means[1:]))
        if "lower" in verdicts:
            claim = "fails (reversed)"
        elif all(v == "higher" for v in verdicts):
            claim = "holds" if shrinking else "fails (not shrinking)"
        elif all(m > 0 for m in means) and shrinking:
            claim = "partly"
        else:
            claim = "inconclusive"
        for (name, a, b), r in zip(pairs, res):
            rows.append({**dict(zip(REGIME, key)), "increment": name, "steps": float(g.steps.mean()),
                         **_comparison_row(r), "mde": minimum_detectable_effect(a, b, tests=len(pairs)),
                         "claim": claim})
    return pd.DataFrame(rows)


def saturation_lines(sat: pd.DataFrame) -> list[str]:
    """Claim (a) as the paper states it: counts over regimes, and the increments pooled over the
    regimes with the regime as block (each regime's mean increment, then a t-interval over the
    regimes)."""
    from analysis.tables import markdown_table
    claims = sat.groupby(list(REGIME), sort=False).claim.first()
    n = len(claims)
    counts = ", ".join(f"{v} in {k}/{n}" for v, k in claims.value_counts().items())
    pooled = []
    for inc, g in sat.groupby("increment", sort=False):
        e = mean_ci(g["diff"].to_numpy(np.float64))
        pooled.append(f"{inc}: {e.mean:+.3f} [{e.low:+.3f}, {e.high:+.3f}]")
    lines = ["#### (a) root saturation at equal steps (the paper's form)", "",
             f"*Tested:* at equal steps (the fewest any of N = {', '.join(map(str, SATURATION_NS))} took to the token "
             "budget), the increments of training pass@1 from each N to the next are positive and shrink; each N at "
             "its rate tuned for tokens; paired over seeds, Holm over the three increments of a regime. The "
             "equal-budget comparison of N = 64 with N = 32 above is a different question.", "",
             f"- {counts} regimes.",
             "- Increments pooled over the regimes (mean of each regime's mean increment, 95 % t-interval over the "
             f"{n} regimes): " + "; ".join(pooled) + ".", "",
             markdown_table(sat.assign(increment=[f"{i}: {d:+.3f} [{lo:+.3f}, {hi:+.3f}] {v}" for i, d, lo, hi, v in
                                                  zip(sat.increment, sat["diff"], sat.low, sat.high, sat.verdict)])
                            .groupby([*REGIME, "claim"], sort=False).increment.agg("; ".join).reset_index()), ""]
    return lines


def _median_range(x: pd.Series) -> str:
    """``median (min-max)`` of the finite values, in pass@1 units."""
    v = x.to_numpy(np.float64)
    v = v[np.isfinite(v)]
    return f"{np.median(v):.3f} ({v.min():.3f}-{v.max():.3f})" if v.size else "—"


def _tally(r: pd.DataFrame) -> str:
    """``tokens 3/1 · rollouts 2/0``: cells significantly better / worse, each unit on its own."""
    return " · ".join(f"{u} {int(((r.unit == u) & (r.better == 'better')).sum())}/"
                      f"{int(((r.unit == u) & (r.better == 'worse')).sum())}" for u in BUDGET_UNITS)


def readout_lines(readouts: pd.DataFrame, n_cells: int) -> list[str]:
    """A markdown table: per comparison (rows) and readout (columns), in how many cells of each unit
    the reference is significantly better / worse (Holm within the cell), the same at each cell's
    headline readout, the minimum detectable effect over the cells (median and range) at the
    whole budget and at the headline readout, and the difference at the headline readout pooled
    over the regimes with the regime as block (the mean of the cells' mean differences with a
    95 % t-interval over the cells), for each unit on its own."""
    from analysis.tables import markdown_table
    labels = list(dict.fromkeys(readouts.readout))
    rows = []
    for pair, g in readouts[readouts.family.isin(("headline", "ladder"))].groupby("pair", sort=False):
        row = {"comparison": pair}
        for label in labels:
            row[label] = _tally(g[g.readout == label])
        h = g[g.headline]
        row["headline readout"] = _tally(h)
        whole = g[g.readout == READOUTS["pass1_at"]]
        row["MDE at the budget"] = _median_range(whole.mde)
        row["MDE at the headline"] = _median_range(h.mde)
        for unit in BUDGET_UNITS:  # each unit on its own: the two units' cells share runs
            e = mean_ci(h[h.unit == unit]["diff"].to_numpy(np.float64))
            row[f"pooled at the headline, {unit}"] = f"{e.mean:+.3f} [{e.low:+.3f}, {e.high:+.3f}]"
        rows.append(row)
    return [markdown_table(pd.DataFrame(rows)), ""]


def claim_readouts(readouts: pd.DataFrame) -> pd.DataFrame:
    """One row per (claim of :data:`HEADLINE_CLAIMS`, cell, readout) of :func:`readouts_table`:
    ``verdict`` (:func:`claim_verdict` on the readout's comparisons, a significant difference read
    in the readout's direction), ``why`` (as :func:`claim_table`) and ``headline`` (the cell's
    headline readout)."""
    rule = {c.key: c.rule for c in CLAIMS}
    r = readouts[readouts.family.str.startswith("claim ")]
    rows = []
    for key, g in r.groupby(["family", *CELL, "readout"], sort=False):
        claim = key[0].split(" ")[1]
        v = list(g.better.map({"better": "higher", "worse": "lower"}).fillna(g.better))
        verdict, why = _claim_verdict_why(rule[claim], v)
        rows.append({"claim": claim, **dict(zip(CELL, key[1:-1])), "readout": key[-1], "verdict": verdict,
                     "why": why, "headline": bool(g.headline.iloc[0])})
    return pd.DataFrame(rows, columns=["claim", *CELL, "readout", "verdict", "why", "headline"])


def _pooled_verdict(low: Sequence[float], high: Sequence[float]) -> str:
    """A claim pooled over regimes: *holds* if every comparison's interval lies above 0, *fails
    (reversed)* if one lies below, *partly* if some but not all lie above, else *inconclusive*."""
    above = [lo > 0 for lo in low]
    if any(hi < 0 for hi in high):
        return "fails (reversed)"
    return "holds" if all(above) else "partly" if any(above) else "inconclusive"


def headline_table(readouts: pd.DataFrame, learners: Sequence[str] = HEADLINE_LEARNERS) -> pd.DataFrame:
    """The map's headline: the cells of ``learners`` (:data:`HEADLINE_LEARNERS`) at their headline
    readout, each unit on its own. One row per (comparison or claim, unit): ``kind`` (``headline``, ``ladder``
    or ``claim``), ``what``, ``unit``, ``cells``; for a comparison ``better`` / ``worse`` (cells
    significant either way, Holm within the cell), ``diff`` / ``low`` / ``high`` (pooled: the
    mean over the regimes of each cell's mean difference, 95 % t-interval over the regimes, the
    regime as block), ``mde`` / ``mde_min`` / ``mde_max`` (median and range of the cells' minimum
    detectable effects); for a claim ``verdicts`` (counts of the per-cell verdicts),
    ``pooled`` (each comparison pooled as above) and ``pooled_verdict`` (:func:`_pooled_verdict`)."""
    h = readouts[readouts.learner.isin(learners) & readouts.headline]
    claims = claim_readouts(h)
    rows = []
    for unit in BUDGET_UNITS:
        hu = h[h.unit == unit]
        for pair, g in hu[hu.family.isin(("headline", "ladder"))].groupby("pair", sort=False):
            e, mde = mean_ci(g["diff"].to_numpy(np.float64)), g.mde.to_numpy(np.float64)
            mde = mde[np.isfinite(mde)]
            rows.append({"kind": g.family.iloc[0], "what": pair, "unit": unit, "cells": len(g),
                         "better": int((g.better == "better").sum()), "worse": int((g.better == "worse").sum()),
                         "diff": e.mean, "low": e.low, "high": e.high,
                         "mde": float(np.median(mde)) if mde.size else np.nan,
                         "mde_min": float(mde.min()) if mde.size else np.nan,
                         "mde_max": float(mde.max()) if mde.size else np.nan})
        for c in HEADLINE_CLAIMS:
            t = claims[(claims.claim == c) & (claims.unit == unit)]
            g = hu[hu.family == f"claim {c}"]
            pooled = [(other, mean_ci(x["diff"].to_numpy(np.float64))) for other, x in g.groupby("other", sort=False)]
            counts = [f"{v} {int((t.verdict == v).sum())}" for v in VERDICTS if (t.verdict == v).any()]
            if (t.why == "reversed").any():
                counts.append(f"of the fails reversed {int((t.why == 'reversed').sum())}")
            rows.append({"kind": "claim", "what": f"({c}) {next(x.title for x in CLAIMS if x.key == c)}",
                         "unit": unit, "cells": len(t), "verdicts": ", ".join(counts),
                         "pooled": "; ".join(f"minus {o} {e.mean:+.3f} [{e.low:+.3f}, {e.high:+.3f}]"
                                             for o, e in pooled),
                         "pooled_verdict": _pooled_verdict([e.low for _, e in pooled], [e.high for _, e in pooled])})
    return pd.DataFrame(rows)


def _headline_comparison(r: Any) -> str:
    return (f"{int(r.better)}/{int(r.worse)} of {int(r.cells)}, pooled {r.diff:+.3f} [{r.low:+.3f}, "
            f"{r.high:+.3f}], MDE {r.mde:.3f} ({r.mde_min:.3f}-{r.mde_max:.3f})")


def headline_rates(tuned: pd.DataFrame) -> tuple[int, int]:
    """(chosen rates at the edge of their grid, chosen rates) over the cells of :data:`HEADLINE_LEARNERS`."""
    chosen = tuned[tuned.chosen.astype(bool) & tuned.learner.isin(HEADLINE_LEARNERS)]
    return int(chosen.edge.astype(bool).sum()), len(chosen)


def sanity_line(per: pd.DataFrame, tuned: pd.DataFrame, readouts: pd.DataFrame) -> str:
    """The learners outside :data:`HEADLINE_LEARNERS` and :data:`TRANSFER_LEARNERS` (the tabular
    one) as a sanity check: rates at
    their grid's edge, runs that end at the ceiling, and DEEP-GRPO vs the best GRPO-N at the
    headline readout, per unit."""
    others = [x for x in LEARNERS if x not in HEADLINE_LEARNERS and x not in TRANSFER_LEARNERS]
    chosen = tuned[tuned.chosen.astype(bool) & tuned.learner.isin(others)]
    runs = per[per.learner.isin(others)]
    deep = readouts[readouts.learner.isin(others) & readouts.headline
                    & (readouts.pair == f"{DEEP} minus {BEST_GRPO}")]
    return (f"{' and '.join(others)} (a sanity check, not in the headline: see `HEADLINE_LEARNERS`): "
            f"{int(chosen.edge.astype(bool).sum())} of {len(chosen)} chosen rates at the edge of their grid; "
            f"{(runs.pass1_at >= CEILING).mean():.0%} of their runs end at pass@1 >= {CEILING:g}; DEEP-GRPO vs the "
            "best GRPO-N at the headline readout better/worse: " + ", ".join(
                f"{u} {int(((deep.unit == u) & (deep.better == 'better')).sum())}/"
                f"{int(((deep.unit == u) & (deep.better == 'worse')).sum())} of {int((deep.unit == u).sum())}"
                for u in BUDGET_UNITS) + ".")


def headline_lines(per: pd.DataFrame, tuned: pd.DataFrame, readouts: pd.DataFrame) -> list[str]:
    """The report's headline section (markdown lines): :func:`headline_table` as two tables, the
    rates at a grid edge, and :func:`sanity_line`."""
    table = headline_table(readouts)
    edge, n_rates = headline_rates(tuned)
    heads = pd.Series({k: v for k, v in headline_readouts(per).items()
                       if k[REGIME.index("learner")] in HEADLINE_LEARNERS}).map(READOUTS).value_counts()
    comp, claims = table[table.kind != "claim"], table[table.kind == "claim"]
    return ["**Headline: the shared-features learners, each cell at its headline readout**", "",
            f"The headline reads the cells of {' and '.join(HEADLINE_LEARNERS)} only ({len(comp.unit.unique())} units "
            f"x {int(comp.cells.max()) if len(comp) else 0} regimes); the tabular learner is a sanity check (last "
            "line) because it searches rather than learns: one update can lock a token in, so its tuned rates pile up "
            "at the top of the grid and most of its runs end at the ceiling. Each cell is read at its headline "
            f"readout, fixed before any comparison (the largest of 1/8, 1/4, 1/2 and the whole budget at which the "
            f"best method's mean pass@1 is below {HEADLINE_SATURATION:g}): "
            + ", ".join(f"{label} in {k}" for label, k in heads.items()) + " cells. The two units read the same "
            "runs, so they are tallied on their own and never summed. *better/worse*: cells where the difference is "
            "significant (Holm within the cell's family); *pooled*: the mean over the regimes of each cell's mean "
            "difference, with a 95 % t-interval over the regimes (the regime as block); *MDE*: median (range) over "
            f"the cells of the minimum detectable effect ({POWER:.0%} power). Chosen learning rates at the edge of "
            f"their grid among these cells: {edge} of {n_rates}.", "",
            _comparisons_markdown(comp), "",
            "The paper's claims (b)-(e) at the same readouts (per-cell verdicts as in the claim sections below; "
            "*pooled verdict*: holds if every comparison's pooled interval lies above 0, fails (reversed) if one "
            "lies below, partly if some lie above):", "",
            _claims_markdown(claims), "",
            "- " + sanity_line(per, tuned, readouts), ""]


def _comparisons_markdown(comp: pd.DataFrame) -> str:
    """The comparison rows of :func:`headline_table` as a markdown table."""
    from analysis.tables import markdown_table
    return markdown_table(pd.DataFrame({
        "comparison": comp.what, "unit": comp.unit,
        "better / worse": [f"{int(b)}/{int(w)} of {int(n)}" for b, w, n in zip(comp.better, comp.worse, comp.cells)],
        "pooled": [f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, lo, hi in zip(comp["diff"], comp.low, comp.high)],
        "MDE": [f"{m:.3f} ({a:.3f}-{b:.3f})" for m, a, b in zip(comp.mde, comp.mde_min, comp.mde_max)]}))


def _claims_markdown(claims: pd.DataFrame) -> str:
    """The claim rows of :func:`headline_table` as a markdown table."""
    from analysis.tables import markdown_table
    return markdown_table(claims[["what", "unit", "cells", "verdicts", "pooled", "pooled_verdict"]].rename(
        columns={"what": "claim", "pooled_verdict": "pooled verdict"}))


def heldout_readout(per: pd.DataFrame, cell: tuple, heads: dict[tuple, str]) -> str:
    """The held-out column a :data:`TRANSFER_LEARNERS` cell is read at: held-out pass@1 at the
    cell's headline readout (:func:`headline_readouts`, fixed from training pass@1 before any
    comparison, so held-out is read where the methods' training has not yet converged); the whole
    budget in a map without the earlier held-out readouts."""
    col = f"heldout_{heads.get(cell, 'pass1_at')}"
    return col if col in per else "heldout_pass1_at"


def transfer_readouts(per: pd.DataFrame, tuned: pd.DataFrame) -> pd.DataFrame:
    """The headline, ladder and claim comparisons of the :data:`TRANSFER_LEARNERS`' cells on
    held-out exact pass@1, each cell at :func:`heldout_readout` (:func:`effects_table` of that
    column on these cells), laid out as :func:`readouts_table`'s rows, each the cell's headline."""
    sub = per[per.learner.isin(TRANSFER_LEARNERS)]
    heads = headline_readouts(per)
    col = {k: heldout_readout(per, k, heads) for k in {tuple(r) for r in sub[list(CELL)].to_numpy()}}
    frames = []
    for metric in dict.fromkeys(col.values()):
        e = effects_table(sub, tuned, metric)
        keep = [col.get(k) == metric for k in zip(*(e[c] for c in CELL))]
        frames.append(e[np.array(keep, dtype=bool)])
    if not frames:
        return pd.DataFrame()
    e = pd.concat(frames, ignore_index=True)
    e = e[e.family.isin(("headline", "ladder", *(f"claim {c}" for c in HEADLINE_CLAIMS)))].copy()
    e["readout"] = ["held-out, " + READOUTS[m[len("heldout_"):]] for m in e.metric]
    e["pair"] = e.comparison.str.replace(r" \(N=\d+\)$", "", regex=True)
    e["better"] = e.verdict.map({"higher": "better", "lower": "worse"}).fillna(e.verdict)
    e["headline"] = True
    return e


def transfer_table(per: pd.DataFrame) -> pd.DataFrame:
    """Figure (i) of the transfer learners, per regime and unit: held-out exact pass@1 of GRPO
    N = 8 at the start and at the budget, and its gain (``gain``, ``low``, ``high``: mean and
    95 % t-interval over seeds, ``up``: share of seeds where it rose), and training pass@1 at the
    budget beside it."""
    g8 = per[per.learner.isin(TRANSFER_LEARNERS) & (per.name == "grpo N=8")]
    rows = []
    for key, g in g8.groupby([*CELL], sort=False):
        gain = (g.heldout_pass1_at - g.heldout_pass1_start).to_numpy(np.float64)
        e = mean_ci(gain)
        rows.append({**dict(zip(CELL, key)), "seeds": len(g), "heldout_start": float(g.heldout_pass1_start.mean()),
                     "heldout_at": float(g.heldout_pass1_at.mean()), "gain": e.mean, "low": e.low, "high": e.high,
                     "up": float(np.mean(gain > 0)), "pass1_at": float(g.pass1_at.mean())})
    return pd.DataFrame(rows)


SELECTOR = "learned-informative"
"""The learned informative selector's method (DEEP-GRPO's utility replaced by the chance of a
mixed K-group per token, with q estimated online from what an LLM backend also observes)."""
HEADROOM_RESAMPLES = 4000
"""Bootstrap resamples (of the evaluation seeds) behind the headroom shares' intervals."""


def _share_interval(num: np.ndarray, den: np.ndarray, rng: np.random.Generator) -> tuple[float, float, float]:
    """``(share, low, high)``: mean(num) / mean(den) over the columns (seeds; ``[regimes, seeds]``,
    pooled over the regimes as the ratio of the regimes' mean differences), with a 95 % percentile
    interval from resampling the seeds (the same seeds in every regime: they share problem-set
    seeds)."""
    share = float(np.mean(num) / np.mean(den))
    pick = rng.integers(0, num.shape[1], size=(HEADROOM_RESAMPLES, num.shape[1]))  # [B, seeds]
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = num[:, pick].mean(axis=(0, 2)) / den[:, pick].mean(axis=(0, 2))  # [B]
    low, high = np.nanpercentile(boot, [2.5, 97.5])
    return share, float(low), float(high)


def headroom_table(per: pd.DataFrame, readouts: pd.DataFrame | None = None, seed: int = 0) -> pd.DataFrame:
    """How much of the oracle's headroom in pivot choice the learned selector captures, in the
    tokens unit (where every informative method divides by generated tokens): per regime,
    (:data:`SELECTOR` - DEEP-GRPO) / (oracle-informative - DEEP-GRPO) at the regime's primary
    readout (the headline readout of training pass@1 for :data:`HEADLINE_LEARNERS`, held-out
    pass@1 at that readout for :data:`TRANSFER_LEARNERS`: :func:`heldout_readout`), with a 95 %
    bootstrap interval over the seeds, the two paired differences (``gain``: selector minus
    DEEP-GRPO, ``headroom``: oracle minus DEEP-GRPO, each with its 95 % t-interval), and one
    pooled row per learner group
    (``spread = "pooled"``). Empty if the map has no selector runs."""
    if SELECTOR not in set(per.name):
        return pd.DataFrame()
    heads = headline_readouts(per)
    rng = np.random.default_rng(seed)
    tok = per[per.unit == "tokens"]
    groups = (("headline", HEADLINE_LEARNERS), ("transfer", TRANSFER_LEARNERS))
    rows = []
    for group, learners in groups:
        if group == "transfer" and "heldout_pass1_at" not in per:
            continue  # a map without held-out problems
        nums, dens = [], []
        for key, g in tok[tok.learner.isin(learners)].groupby(list(CELL), sort=False):
            cell = tuple(key)
            metric = heldout_readout(per, cell, heads) if group == "transfer" else heads.get(cell, "pass1_at")
            wide = g.pivot_table(index="seed", columns="name", values=metric)
            if not {SELECTOR, DEEP, "oracle-informative"} <= set(wide.columns):
                continue
            w = wide[[SELECTOR, DEEP, "oracle-informative"]].dropna()
            num = (w[SELECTOR] - w[DEEP]).to_numpy(np.float64)
            den = (w["oracle-informative"] - w[DEEP]).to_numpy(np.float64)
            share, low, high = _share_interval(num[None], den[None], rng)
            gain, room = mean_ci(num), mean_ci(den)
            label = READOUTS[metric[len("heldout_"):]] if metric.startswith("heldout_") else READOUTS[metric]
            rows.append({**dict(zip(CELL, key)), "group": group,
                         "readout": ("held-out, " if metric.startswith("heldout_") else "") + label,
                         "seeds": len(w), "gain": gain.mean, "gain_low": gain.low, "gain_high": gain.high,
                         "headroom": room.mean, "headroom_low": room.low, "headroom_high": room.high,
                         "share": share, "share_low": low, "share_high": high})
            nums.append(num)
            dens.append(den)
        if nums and len({len(x) for x in nums}) == 1:
            num, den = np.stack(nums), np.stack(dens)  # [regimes, seeds]
            share, low, high = _share_interval(num, den, rng)
            gain, room = mean_ci(num.mean(axis=1)), mean_ci(den.mean(axis=1))
            rows.append({"spread": "pooled", "recovery": "", "learner": " and ".join(learners), "unit": "tokens",
                         "group": group, "readout": "as above", "seeds": num.shape[1], "gain": gain.mean,
                         "gain_low": gain.low, "gain_high": gain.high, "headroom": room.mean,
                         "headroom_low": room.low, "headroom_high": room.high, "share": share, "share_low": low,
                         "share_high": high})
    return pd.DataFrame(rows)


def transfer_lines(a: MapAnalysis) -> list[str]:
    """The report's transfer section: the :data:`TRANSFER_LEARNERS`' cells on held-out pass@1
    (figure (i) by regime, then :func:`headline_table` of :func:`transfer_readouts`); empty when
    the map has none of their cells."""
    from analysis.tables import markdown_table
    per = a.per
    if "heldout_pass1_at" not in a.effects or not per.learner.isin(TRANSFER_LEARNERS).any():
        return []
    fig = transfer_table(per)
    readouts = transfer_readouts(per, a.tuned)
    table = headline_table(readouts, TRANSFER_LEARNERS)
    readout_counts = readouts.drop_duplicates(list(CELL)).readout.value_counts()
    comp, claims = table[table.kind != "claim"], table[table.kind == "claim"]
    skills = ", ".join(f"{k} = {v:g}" for k, v in SKILLS_DEFAULTS.items())
    return ["**Transfer: the skills learner on held-out problems**", "",
            f"The {' and '.join(TRANSFER_LEARNERS)} cells train the skills policy (`sims.policy`: a free table per "
            f"problem plus one shared by the steps that call on the same skill) on problem sets with skills "
            f"({skills}: a step's correct token is its skill's token with that chance, so what a skill learns on "
            "training problems carries over to held-out problems, mostly helping and sometimes hurting). Its primary "
            "readout is held-out exact pass@1, on problems never trained on: GRPO N = 8's gain at the whole budget "
            "shows that learning transfers; the methods are compared at each cell's headline readout (the budget "
            "fixed from training pass@1 as for the headline, where the best method's training pass@1 is still "
            f"below {HEADLINE_SATURATION:g}), so held-out is read while training has not converged: "
            + ", ".join(f"{k.removeprefix('held-out, ')} in {v}" for k, v in readout_counts.items())
            + " cells. Rates are tuned on "
            "training pass@1 as for every learner: the held-out problems choose nothing.", "",
            "Learning transfers: GRPO N = 8's held-out pass@1 at the start and at the budget, and its gain (mean, "
            "95 % t-interval over seeds, share of seeds where it rose):", "",
            markdown_table(pd.DataFrame({
                "regime": [f"{sp}, {r}" for sp, r in zip(fig.spread, fig.recovery)], "unit": fig.unit,
                "held-out start": fig.heldout_start.map("{:.3f}".format),
                "held-out at budget": fig.heldout_at.map("{:.3f}".format),
                "gain": [f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, lo, hi in zip(fig.gain, fig.low, fig.high)],
                "rose in": fig.up.map("{:.0%}".format),
                "training at budget": fig.pass1_at.map("{:.3f}".format)})), "",
            "The headline comparisons and the ladder on held-out pass@1 at each cell's headline readout (as in the "
            "headline: "
            "*better/worse* cells, Holm within the cell; *pooled* over the regimes, the regime as block):", "",
            _comparisons_markdown(comp), "", "The paper's claims (b)-(e) on held-out pass@1 at the same readouts:", "",
            _claims_markdown(claims), ""]


def transfer_summary(a: MapAnalysis) -> list[str]:
    """The README's lines on the :data:`TRANSFER_LEARNERS` (held-out pass@1) and the learned
    selector's share of the oracle's headroom (:func:`headroom_table`, pooled rows); empty when the
    map has neither."""
    out = []
    per = a.per
    if "heldout_pass1_at" in a.effects and per.learner.isin(TRANSFER_LEARNERS).any():
        fig = transfer_table(per)
        tok = fig[fig.unit == "tokens"]
        table = headline_table(transfer_readouts(per, a.tuned), TRANSFER_LEARNERS)
        out += [f"**Transfer** ({' and '.join(TRANSFER_LEARNERS)}: the skills policy on problem sets with skills, read "
                "on held-out problems never trained on; GRPO N = 8 at the whole budget, the comparisons at each cell's "
                "headline readout):", "",
                f"- GRPO N = 8 raises held-out pass@1 in {int((tok.low > 0).sum())} of {len(tok)} regimes (95 % "
                "interval above 0; tokens): " + "; ".join(
                    f"{sp}, {r} {s0:.3f} → {s1:.3f} ({d:+.3f} [{lo:+.3f}, {hi:+.3f}])" for sp, r, s0, s1, d, lo, hi in
                    zip(tok.spread, tok.recovery, tok.heldout_start, tok.heldout_at, tok.gain, tok.low, tok.high))
                + "."]
        for what, g in table[table.kind == "headline"].groupby("what", sort=False):  # the ladder: in REPORT.md
            out.append(f"- {what.replace(DEEP, 'DEEP-GRPO').replace(' minus ', ' vs ')} (held-out): "
                       + "; ".join(f"{r.unit} {_headline_comparison(r)}" for r in g.itertuples()) + ".")
        out.append("")
    h = headroom_table(per)
    pooled = h[h.spread == "pooled"] if len(h) else h
    if len(pooled):
        out += [f"**Learned selector** (`{SELECTOR}`: the informative pivot with q estimated online from what an LLM "
                "also observes) — share of the oracle-informative pivot's headroom over DEEP-GRPO it captures, "
                "pooled over regimes (tokens unit, 95 % seed bootstrap): " + "; ".join(
                    f"{r.learner} {r.share:+.2f} [{r.share_low:+.2f}, {r.share_high:+.2f}] (selector − DEEP-GRPO "
                    f"{r.gain:+.3f}, oracle − DEEP-GRPO {r.headroom:+.3f})" for r in pooled.itertuples()) + ".", ""]
    return out


def headroom_lines(a: MapAnalysis) -> list[str]:
    """The report's section "How much of the oracle's headroom can a learned selector capture?"
    (:func:`headroom_table`); empty without selector runs."""
    from analysis.tables import markdown_table
    h = headroom_table(a.per)
    if not len(h):
        return []
    show = h.assign(
        regime=[f"{sp}, {r}" if sp != "pooled" else "pooled" for sp, r in zip(h.spread, h.recovery)],
        **{"selector − DEEP-GRPO": [f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, lo, hi in
                                    zip(h.gain, h.gain_low, h.gain_high)],
           "oracle − DEEP-GRPO": [f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, lo, hi in
                                  zip(h.headroom, h.headroom_low, h.headroom_high)],
           "share captured": [f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]" for d, lo, hi in
                              zip(h.share, h.share_low, h.share_high)]})
    pooled = h[h.spread == "pooled"]
    lines = ["### How much of the oracle's headroom can a learned selector capture?", "",
             f"*Selector:* `{SELECTOR}`, the informative pivot (the chance of a mixed K-group per generated token, "
             "1 - q^K - (1 - q)^K divided by the suffix's tokens) with q, the chance that one continuation succeeds, "
             "estimated online from what an LLM backend also observes (`deepgrpo.estimators.SelectorLogistic`: "
             "relative depth, the group's success rate, the prefix's log-probability and its mean, the policy's "
             "entropy at the cut, the prefix's length and the tokens after the cut; nothing from the oracle), "
             "fitted to each pivot's successes among its continuations. *Share captured:* (selector − DEEP-GRPO) /"
             " (oracle-informative − DEEP-GRPO) at each regime's primary readout (training pass@1 at the headline "
             "readout for the features learners, held-out pass@1 at the same readout for the skills learner), in the "
             f"tokens unit, with a 95 % bootstrap interval over the seeds ({HEADROOM_RESAMPLES} resamples; pooled: "
             "the ratio of the regimes' mean differences, the seeds resampled jointly). A share is only meaningful"
             " where the oracle's headroom is clearly above 0; where its interval reaches 0 the share's interval "
             "is wide or unbounded.", ""]
    for r in pooled.itertuples():
        lines.append(f"- Pooled over the {r.learner} regimes: share {r.share:+.2f} [{r.share_low:+.2f}, "
                     f"{r.share_high:+.2f}]; selector − DEEP-GRPO {r.gain:+.3f} [{r.gain_low:+.3f}, "
                     f"{r.gain_high:+.3f}], oracle − DEEP-GRPO {r.headroom:+.3f} [{r.headroom_low:+.3f}, "
                     f"{r.headroom_high:+.3f}] (t-intervals over the regimes).")
    lines += ["", markdown_table(show[["learner", "regime", "readout", "seeds", "selector − DEEP-GRPO",
                                       "oracle − DEEP-GRPO", "share captured"]]), ""]
    return lines


# ------------------------------------------------------------------------------------------
# figures
#
# Drawn without Axes: every panel's marks (cells, bars, interval lines, frames, tick marks) are
# collected in inches and added to the figure as one collection per kind, with one Text per
# label, placed where matplotlib places them in a grid of Axes (tick marks 3.5 pt outward, tick
# labels 3.5 pt beyond them, axis labels 4 pt beyond those, titles 6 pt above; autoscaled limits,
# AutoLocator ticks, ScalarFormatter labels). An Axes with its ticks costs tens of milliseconds to
# create and to draw, seaborn's heatmap draws the whole figure once per panel (and importing
# seaborn imports scipy.stats), and tight_layout draws the figure once more to measure it: the
# quick map's three figures took 13 s on 2 shared cores, now about 2 s, most of it the rendering
# of their text.

DPI = 110
"""Resolution of the PNG figures."""
PT = 1 / 72
"""A point in inches."""


def _mark(verdict: str, verdict_map: str) -> str:
    """``**`` significant over the whole map, ``*`` within the cell (Holm), ``=`` equivalent."""
    if verdict_map in ("higher", "lower"):
        return "**"
    return {"higher": "*", "lower": "*", "equivalent": "="}.get(verdict, "")


def _regime_label(spread: str, recovery: str) -> str:
    return f"{recovery}, {spread}"


def _text(fig, x: float, y: float, s: str, **kw) -> None:
    """A text at ``(x, y)`` inches from the figure's lower left corner."""
    fig.text(x, y, s, transform=fig.dpi_scale_trans, **kw)


def _text_extent(fig, labels: Sequence[str], size: float) -> tuple[float, float]:
    """``(width, height)`` in inches of the widest and of the tallest one-line label of ``labels``
    at font ``size`` as matplotlib lays them out (a line is at least as tall as "lp")."""
    from matplotlib.font_manager import FontProperties
    renderer, prop = fig.canvas.get_renderer(), FontProperties(size=size)
    sizes = [renderer.get_text_width_height_descent(s, prop, ismath=False) for s in ("lp", *labels)]
    return max((w for w, _, _ in sizes[1:]), default=0.0) / fig.dpi, max(h for _, h, _ in sizes) / fig.dpi


def _tick_marks(fig, points: list[tuple[float, float]], marker) -> None:
    """Major tick marks (3.5 pt long, 0.8 pt wide) at ``points`` (inches); ``marker`` is one of
    matplotlib's TICKDOWN / TICKLEFT / TICKRIGHT."""
    from matplotlib.lines import Line2D
    if points:
        fig.add_artist(Line2D([p[0] for p in points], [p[1] for p in points], ls="none", marker=marker, ms=3.5,
                              mew=0.8, color="k", transform=fig.dpi_scale_trans, zorder=2.5))


def _rects(fig, rects: list[tuple[float, float, float, float]], colors, **kw) -> None:
    """Filled rectangles ``(x, y, width, height)`` in inches, one colour each, as one collection."""
    from matplotlib.collections import PolyCollection
    fig.add_artist(PolyCollection([[(x, y), (x + w, y), (x + w, y + h), (x, y + h)] for x, y, w, h in rects],
                                  facecolors=colors, edgecolors="none", transform=fig.dpi_scale_trans, **kw))


def _linear_ticks(lo: float, hi: float, length: float, label_size: float) -> tuple[np.ndarray, list[str], str]:
    """``(ticks, labels, offset)`` of a linear axis over [lo, hi] that is ``length`` inches long
    with labels of ``label_size`` points: AutoLocator's ticks ('auto' bins: one per two label
    heights, at most 9) inside the limits and ScalarFormatter's labels."""
    from matplotlib.ticker import MaxNLocator, ScalarFormatter
    locator = MaxNLocator(nbins=int(np.clip(length / PT // (2 * label_size), 1, 9)), steps=[1, 2, 2.5, 5, 10])
    ticks = locator.tick_values(lo, hi)
    fmt = ScalarFormatter()
    fmt.create_dummy_axis()
    fmt.axis.set_view_interval(lo, hi)
    labels = fmt.format_ticks(ticks)
    tol = (hi - lo) * 1e-10  # the ticks matplotlib draws: those inside the limits, to a tolerance
    inside = (ticks >= lo - tol) & (ticks <= hi + tol)
    return ticks[inside], [s for s, ok in zip(labels, inside) if ok], fmt.get_offset()


def heatmaps(cells: pd.DataFrame, path: Path) -> None:
    """Per budget unit (rows): DEEP-GRPO minus the best GRPO-N and minus root-only (columns of
    panels) as heatmaps over (spread x recovery) x learner, with the significance marks of
    :func:`_mark` and, in the first panel, each cell's winner (drawn as seaborn's ``heatmap``
    with a colour bar drew it)."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize
    from matplotlib.markers import TICKDOWN, TICKLEFT, TICKRIGHT
    units = [u for u in BUDGET_UNITS if u in set(cells.unit)]
    learners = list(LEARNERS)
    width, height = 15.0, 4.4 * len(units)
    # inches: the suptitle, the x labels of the bottom row, the gap between rows (x labels, title)
    top, bottom, gap = 0.65, 0.59, 0.8
    panel_h = (height - top - bottom - gap * (len(units) - 1)) / len(units)
    left, panel_w, pitch, bar_gap = 1.44, 4.79, 7.42, 0.3  # y labels; a panel; panel + colour bar
    bar_w = panel_h / 20
    lim = float(np.nanmax(np.abs(cells[["deep_minus_best_grpo", "deep_minus_root_only"]].to_numpy())))
    lim = lim if np.isfinite(lim) and lim > 0 else 0.1
    cmap, norm = plt.get_cmap("RdBu"), Normalize(-lim, lim)
    bar_ticks, bar_labels, bar_offset = _linear_ticks(-lim, lim, panel_h, 10)
    levels = np.linspace(-lim, lim, cmap.N + 1)  # the colour bar: one band per colour of the map
    fig = plt.figure(figsize=(width, height))
    boxes, colors, down, left_marks, right_marks = [], [], [], [], []
    for i, u in enumerate(units):
        c = cells[cells.unit == u]
        regime = [_regime_label(s, r) for s, r in zip(c.spread, c.recovery)]
        rows = list(dict.fromkeys(regime))
        keep = np.array([lr in LEARNERS for lr in c.learner], dtype=bool)
        at = [(rows.index(g), learners.index(lr)) for g, lr, ok in zip(regime, c.learner, keep) if ok]
        if len(set(at)) < len(at):
            raise ValueError(f"cells.csv has two rows for one regime and learner in unit {u}")
        y0 = height - top - panel_h - i * (panel_h + gap)
        cw, rh = panel_w / len(learners), panel_h / len(rows)
        ylabel_w, _ = _text_extent(fig, rows, 10)
        _, xlabel_h = _text_extent(fig, learners, 10)
        for j, (tag, title) in enumerate((("best_grpo", "DEEP-GRPO minus best GRPO-N"),
                                          ("root_only", "DEEP-GRPO minus root-only"))):
            x0 = left + j * pitch
            diff = c[f"deep_minus_{tag}"].to_numpy(np.float64)[keep]
            text = np.array([f"{d:+.3f}{_mark(v, m)}" + (f"\nwin: {w}\nN*={n}" if j == 0 else "")
                             for d, v, m, w, n in zip(c[f"deep_minus_{tag}"], c[f"deep_minus_{tag}_verdict"],
                                                      c[f"deep_minus_{tag}_map"], c.winner, c.best_N)],
                            dtype=object)[keep]
            rgb = cmap(norm(diff))
            # seaborn's annotation colours: dark text on light cells (relative luminance > 0.408)
            lin = np.where(rgb[:, :3] <= 0.03928, rgb[:, :3] / 12.92, ((rgb[:, :3] + 0.055) / 1.055) ** 2.4)
            for (r, k), d, t, color, light in zip(at, diff, text, rgb, lin @ [0.2126, 0.7152, 0.0722] > 0.408):
                if np.isfinite(d):  # NaN cells stay blank
                    boxes.append((x0 + k * cw, y0 + panel_h - (r + 1) * rh, cw, rh))
                    colors.append(color)
                    _text(fig, x0 + (k + 0.5) * cw, y0 + panel_h - (r + 0.5) * rh, t, ha="center", va="center",
                          fontsize=7, color=".15" if light else "w")
            down += [(x0 + (k + 0.5) * cw, y0) for k in range(len(learners))]
            left_marks += [(x0, y0 + panel_h - (r + 0.5) * rh) for r in range(len(rows))]
            for k, lr in enumerate(learners):
                _text(fig, x0 + (k + 0.5) * cw, y0 - 7 * PT, lr, ha="center", va="top", fontsize=10)
            for r, g in enumerate(rows):
                _text(fig, x0 - 7 * PT, y0 + panel_h - (r + 0.5) * rh, g, ha="right", va="center", fontsize=10)
            _text(fig, x0 + panel_w / 2, y0 - 7 * PT - xlabel_h - 4 * PT, "policy / optimizer", ha="center",
                  va="top", fontsize=10)
            _text(fig, x0 - 7 * PT - ylabel_w - 4 * PT, y0 + panel_h / 2, "recovery, spread", ha="center",
                  va="bottom", rotation=90, rotation_mode="anchor", fontsize=10)
            _text(fig, x0 + panel_w / 2, y0 + panel_h + 6 * PT, f"{title}, pass@1 at {int(c.budget.iloc[0]):,} {u}",
                  ha="center", va="baseline", fontsize=12)
            # the colour bar
            bx = x0 + panel_w + bar_gap
            boxes += [(bx, y0 + (lo + lim) / (2 * lim) * panel_h, bar_w, (hi - lo) / (2 * lim) * panel_h)
                      for lo, hi in zip(levels[:-1], levels[1:])]
            colors += list(cmap(norm((levels[:-1] + levels[1:]) / 2)))
            right_marks += [(bx + bar_w, y0 + (t + lim) / (2 * lim) * panel_h) for t in bar_ticks]
            for t, s in zip(bar_ticks, bar_labels):
                _text(fig, bx + bar_w + 7 * PT, y0 + (t + lim) / (2 * lim) * panel_h, s, ha="left",
                      va="center_baseline", fontsize=10)
            if bar_offset:
                _text(fig, bx + bar_w, y0 + panel_h + 2 * PT, bar_offset, ha="left", va="bottom", fontsize=10)
            _text(fig, bx + bar_w + 7 * PT + _text_extent(fig, bar_labels, 10)[0] + 4 * PT, y0 + panel_h / 2,
                  "difference in pass@1", ha="center", va="top", rotation=90, rotation_mode="anchor", fontsize=10)
    _rects(fig, boxes, colors, linewidths=0, antialiased=False, zorder=1)  # pcolormesh's
    for marks, marker in ((down, TICKDOWN), (left_marks, TICKLEFT), (right_marks, TICKRIGHT)):
        _tick_marks(fig, marks, marker)
    fig.suptitle("Regime map: * Holm-significant within the cell, ** over the whole map, = equivalent (±"
                 f"{EQUIVALENCE_MARGIN:g}); first panel: the cell's winner among GRPO-N and the ladder, and N* the "
                 "best GRPO-N (tuning seeds)", fontsize=9)
    _save(fig, path)


def _shared_ylim(values: np.ndarray, sticky: np.ndarray) -> tuple[float, float]:
    """Matplotlib's autoscaled limits of a linear axis shared by every panel: the data range
    plus 5 % margins, where a margin does not cross a bar's base (its sticky edge)."""
    from matplotlib.ticker import MaxNLocator
    locator = MaxNLocator()  # AutoLocator's class: its nonsingular and view_limits
    values = values[np.isfinite(values)]
    lo, hi = locator.nonsingular(*((values.min(), values.max()) if values.size else (-np.inf, np.inf)))
    sticky = np.sort(sticky[np.isfinite(sticky)])
    tol = 1e-5 * abs(hi - lo)
    delta = (hi - lo) * 0.05
    new_lo, new_hi = lo - delta, hi + delta
    i0 = sticky.searchsorted(lo + tol) - 1
    if i0 != -1:
        new_lo = max(new_lo, sticky[i0])
    i1 = sticky.searchsorted(hi - tol)
    if i1 != len(sticky):
        new_hi = min(new_hi, sticky[i1])
    return locator.view_limits(new_lo, new_hi)


def waterfalls(per: pd.DataFrame, effects: pd.DataFrame, tuned: pd.DataFrame, unit: str, path: Path) -> None:
    """The ladder as a waterfall in every regime (one panel per regime, sharing the y axis) in
    ``unit``: the best GRPO-N's mean pass@1 at the budget, then each rung's step (mean paired
    difference with its Holm interval within the cell), ending at the oracle rungs."""
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    from matplotlib.colors import to_rgba
    from matplotlib.lines import Line2D
    from matplotlib.markers import TICKDOWN, TICKLEFT
    best = _best_n(tuned)
    short = ["GRPO-N*", "root-only", "random", "depth", "DEEP", "state", "oracle", "orac-inf"]
    nrow, ncol = len(SPREADS) * len(RECOVERY), len(LEARNERS)
    e = effects[(effects.metric == "pass1_at") & (effects.family == "ladder") & (effects.unit == unit)]
    ecol = _columns(e, (*REGIME, "diff", "low", "high", "verdict"))
    ladder = {tuple(ecol[c][idx[0]] for c in REGIME): idx for idx in _group_rows(e, REGIME)}
    p = per[per.unit == unit]
    pcol = _columns(p, (*REGIME, "name", "budget"))
    pass1 = p.pass1_at.to_numpy(np.float64)
    runs = {tuple(pcol[c][idx[0]] for c in REGIME): idx for idx in _group_rows(p, REGIME)}
    panels = []  # (row, column, title, ylabel)
    bars = []  # (row, column, x, bottom, height, rgba), as ax.bar(x, height, bottom=bottom)
    errs = []  # (row, column, x, low, high)
    for r in regimes():
        key = tuple(r[c] for c in REGIME)
        if key not in runs:
            continue
        idx = runs[key]
        i = list(SPREADS).index(r["spread"]) * len(RECOVERY) + list(RECOVERY).index(r["recovery"])
        j = list(LEARNERS).index(r["learner"])
        panels.append((i, j, f"{r['recovery']}, {r['spread']}, {r['learner']}",
                       f"pass@1 at {int(pcol['budget'][idx[0]]):,} {unit}"))
        start = _mean(pass1[idx][pcol["name"][idx] == f"grpo N={best[(*key, unit)]}"])
        bars.append((i, j, 0, 0.0, start, to_rgba("0.6")))
        level = start
        for k, s in enumerate(ladder.get(key, []), start=1):
            diff, low, high = ecol["diff"][s], ecol["low"][s], ecol["high"][s]
            bars.append((i, j, k, level, diff, to_rgba("C2" if diff >= 0 else "C3",
                                                       0.9 if ecol["verdict"][s] in ("higher", "lower") else 0.4)))
            if np.isfinite(low):
                errs.append((i, j, k, level + diff - (diff - low), level + diff + (high - diff)))
            level += diff
    bars = [b for b in bars if np.isfinite(b[3]) and np.isfinite(b[4])]
    errs = [b for b in errs if np.isfinite(b[3]) and np.isfinite(b[4])]

    # layout (inches); x as bar() autoscales the 8 bars (width 0.8, 5 % margins), y shared
    width, height = 3.6 * ncol, 2.5 * nrow
    left, right, bottom, top, wgap, hgap = 0.61, 0.15, 0.69, 0.61, 0.2, 0.37
    pw = (width - left - right - wgap * (ncol - 1)) / ncol
    ph = (height - bottom - top - hgap * (nrow - 1)) / nrow
    x_lo, x_hi = -0.4 - 0.05 * (len(short) - 0.2), len(short) - 0.6 + 0.05 * (len(short) - 0.2)
    y_lo, y_hi = _shared_ylim(np.array([v for b in bars for v in (b[3], b[3] + b[4])]
                                       + [v for b in errs for v in b[3:]]), np.array([b[3] for b in bars]))
    ticks, labels, offset = _linear_ticks(y_lo, y_hi, ph, 7)

    def x0(j):
        return left + j * (pw + wgap)

    def y0(i):
        return height - top - ph - i * (ph + hgap)

    def X(j, x):
        return x0(j) + (x - x_lo) / (x_hi - x_lo) * pw

    def Y(i, y):
        return y0(i) + (y - y_lo) / (y_hi - y_lo) * ph

    fig = plt.figure(figsize=(width, height))
    inches = fig.dpi_scale_trans
    grid = [(i, j) for i in range(nrow) for j in range(ncol)]
    _rects(fig, [(X(j, x - 0.4), Y(i, b), X(j, x + 0.4) - X(j, x - 0.4), Y(i, b + h) - Y(i, b))
                 for i, j, x, b, h, _ in bars], [b[5] for b in bars], linewidths=1.0, zorder=1)  # bar()'s
    # the intervals: errorbar(lw=0.8, capsize=2)'s lines and caps
    fig.add_artist(LineCollection([[(X(j, x), Y(i, lo)), (X(j, x), Y(i, hi))] for i, j, x, lo, hi in errs],
                                  colors="k", linewidths=0.8, transform=inches, zorder=2))
    fig.add_artist(Line2D([X(j, x) for i, j, x, _, _ in errs] * 2,
                          [Y(i, lo) for i, _, _, lo, _ in errs] + [Y(i, hi) for i, _, _, _, hi in errs],
                          ls="none", marker="_", ms=4, mew=1.0, color="k", transform=inches, zorder=2))
    # frames (the spines) of every panel of the grid
    fig.add_artist(LineCollection([[(x0(j), y0(i)), (x0(j) + pw, y0(i)), (x0(j) + pw, y0(i) + ph),
                                    (x0(j), y0(i) + ph), (x0(j), y0(i))] for i, j in grid],
                                  colors="k", linewidths=0.8, transform=inches, zorder=2.5))
    _tick_marks(fig, [(X(j, k), y0(i)) for i, j, *_ in panels for k in range(len(short))], TICKDOWN)
    _tick_marks(fig, [(x0(j), Y(i, t)) for i, j in grid for t in ticks], TICKLEFT)
    label_w, _ = _text_extent(fig, labels, 7)
    for i, j, title, ylabel in panels:
        _text(fig, x0(j) + pw / 2, y0(i) + ph + 6 * PT, title, fontsize=8, ha="center", va="baseline")
        if i == nrow - 1:
            for k, s in enumerate(short):
                _text(fig, X(j, k), y0(i) - 7 * PT, s, fontsize=7, rotation=60, ha="center", va="top")
        if j == 0:
            _text(fig, x0(j) - 7 * PT - label_w - 4 * PT, y0(i) + ph / 2, ylabel, fontsize=7, rotation=90,
                  rotation_mode="anchor", ha="center", va="bottom")
    for i in range(nrow):  # the shared y axis is labelled in the first column
        for t, s in zip(ticks, labels):
            _text(fig, x0(0) - 7 * PT, Y(i, t), s, fontsize=7, ha="right", va="center_baseline")
        if offset:
            _text(fig, x0(0), y0(i) + ph + 2 * PT, offset, fontsize=7, ha="left", va="bottom")
    fig.suptitle(f"Decomposition ladder per regime ({unit}): the best GRPO-N (grey), then each rung's step "
                 "(green up, red down; solid = Holm-significant within the cell; bars: Holm 95 % intervals)",
                 fontsize=9)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    """Write ``fig`` as a PNG (atomic) and close it (the figure is laid out by its maker)."""
    import matplotlib.pyplot as plt
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=DPI))
    plt.close(fig)


# ------------------------------------------------------------------------------------------
# running the map


def _tuned_table(tables: dict[str, pd.DataFrame], base: list[Cell]) -> pd.DataFrame:
    """The per-unit tuning tables as one, with each variant's cell columns."""
    cols = pd.DataFrame([{"variant": c.variant, **c.columns} for c in base])
    out = pd.concat([t.assign(unit=u) for u, t in tables.items()], ignore_index=True).merge(cols, on="variant")
    return out[["variant", *CELL, "name", "family", "lr", "criterion", "criterion_sd", "n", "chosen", "edge"]]


def run_regime_map(out: str | Path, seeds: int | None = None, size: str = "full", workers: int | None = None,
                   progress: bool = True) -> Path:
    """Run the regime map (tuning, then evaluation; resumable) and write its tables and figures to
    ``out/regime-map`` (see the module docstring); returns that directory. ``seeds``: evaluation
    seeds (None: the size's, :attr:`MapSize.seeds`)."""
    if size not in SIZES:
        raise ConfigError(f"size = {size!r} is invalid: expected one of {', '.join(SIZES)}")
    seeds = SIZES[size].seeds if seeds is None else seeds
    if not 2 <= seeds <= TUNING_SEED_BASE:
        raise ConfigError(f"--seeds = {seeds} is invalid: expected an integer in [2, {TUNING_SEED_BASE}] (paired "
                          "intervals need two seeds; evaluation seeds stay below the tuning seeds)")
    from analysis.studies import run_sim_cell, run_sim_cells, sim_batch_key, sim_run_complete
    from analysis.sweep import CellTables
    from sims.optim import DEFAULT_LR
    sz = SIZES[size]
    ends = budgets(sz)
    d = Path(out) / STUDY
    t0 = time.perf_counter()
    ran = 0  # runs this invocation ran (the rest were finished by an earlier one)
    base = base_cells(sz)
    grids = {c.variant: [DEFAULT_LR[_optimizer(c)] * f for f in sz.lr_factors] for c in base}
    limits = {o: (lr * min(sz.lr_factors) / 2 ** sz.max_extensions, lr * max(sz.lr_factors) * 2 ** sz.max_extensions)
              for o, lr in DEFAULT_LR.items()}
    tune = tuning_cells(base, grids, sz.tuning_seeds, ends["tokens"], "tokens", sz.max_steps)
    stage = "learning-rate tuning"
    tune_tables = CellTables(d / "tuning", sim_run_complete)  # every cell file is read once
    eval_tables = CellTables(d, sim_run_complete)
    float_ends = {k: float(v) for k, v in ends.items()}
    try:
        while True:
            ran += len(tune) - tune_tables.count_finished(tune)
            tuning_runs = run_sweep(tune, run_sim_cell, d / "tuning", "runs", workers=workers, progress=progress,
                                    batch_worker=run_sim_cells, batch_key=sim_batch_key,
                                    complete=sim_run_complete, tables=tune_tables, write_table=False)
            per_tuning = budget_table(tuning_runs, ends=float_ends)  # both units' readings, once
            tables = {u: choose_rates(tuning_runs, unit=u, ends=float_ends, per=per_tuning) for u in BUDGET_UNITS}
            grown = False
            for opt, (lo, hi) in limits.items():
                mine = {c.variant for c in base if _optimizer(c) == opt}
                for t in tables.values():
                    grown |= extend_grids(t[t.variant.isin(mine)], grids, lo, hi)
            if not grown:
                break
            tune = tuning_cells(base, grids, sz.tuning_seeds, ends["tokens"], "tokens", sz.max_steps)
        write_csv_atomic(d / "tuning" / "runs.csv", tuning_runs)  # once, when the grids stop growing
        stage = "choosing the learning rates"
        tuned = _tuned_table(tables, base)
        write_csv_atomic(d / "tuned_lr.csv", tuned)
        rates = tuned[tuned.chosen.astype(bool)].groupby("variant").lr.unique()
        evaluation = [with_protocol(c, float(lr), ends["tokens"], "tokens", sz.max_steps, seed=s)
                      for c in base for lr in sorted(rates[c.variant]) for s in range(seeds)]
        stage = "evaluation"
        ran += len(evaluation) - eval_tables.count_finished(evaluation)
        runs = run_sweep(evaluation, run_sim_cell, d, "runs", workers=workers, progress=progress,
                         batch_worker=run_sim_cells, batch_key=sim_batch_key,
                         complete=sim_run_complete, tables=eval_tables)
        stage = "writing the tables and figures"
        per = per_run_table(runs, tuned, ends)
        write_csv_atomic(d / "per_run.csv", per)
        write_outputs(d, per, tuned, runs, workers=workers, theory_spec=sz.spec)
    except KeyboardInterrupt:  # also the sweeps' Interrupted
        raise Interrupted(f"study {STUDY}, during {stage}: finished runs are kept in {d}; rerun the same command "
                          "to resume") from None
    previous = json.loads((d / "study.json").read_text()).get("invocations", []) if (d / "study.json").is_file() else []
    invocations = [*previous, {"runs": ran, "wall_time_s": time.perf_counter() - t0, "workers": workers}]
    write_json_atomic(d / "study.json", {
        "study": STUDY, "seeds": seeds, "evaluation_seeds": list(range(seeds)), "size": size,
        "size_config": vars(sz), "budgets": ends, "axes": {"spread": SPREADS, "recovery": RECOVERY,
                                                           "learner": LEARNERS, "unit": list(BUDGET_UNITS)},
        "methods": {m.name: {"method": m.method, "algo": m.algo, "family": m.family, "what": m.what} for m in METHODS},
        "protocol": {"tuning_seeds": [TUNING_SEED_BASE + i for i in range(sz.tuning_seeds)],
                     "default_lr": DEFAULT_LR, "lr_limits": limits, "alpha": ALPHA,
                     "equivalence_margin": EQUIVALENCE_MARGIN},
        "tuning_runs": len(tune), "evaluation_runs": len(evaluation), "invocations": invocations,
        "wall_time_s": sum(i["wall_time_s"] for i in invocations), "versions": versions()})
    return d


def effect_metrics(per: pd.DataFrame) -> list[str]:
    """The metrics of ``per`` that get an :func:`effects_table`: the whole-budget pass@1, held-out
    pass@1 and AUC, then every other readout of :data:`READOUTS` present (each once)."""
    return [m for m in dict.fromkeys(("pass1_at", "heldout_pass1_at", "pass1_auc", *READOUTS)) if m in per]


def write_outputs(d: Path, per: pd.DataFrame, tuned: pd.DataFrame, runs: pd.DataFrame | None = None,
                  workers: int | None = None, theory_spec: dict | None = None) -> None:
    """``map.csv``, ``effects.csv``, ``cells.csv``, ``readouts.csv`` and the figures, from
    ``per_run.csv``'s table; with the evaluation ``runs``, also ``equal_steps.csv``
    (:func:`equal_steps_table`); with ``theory_spec`` (the map's TokenTreeSpec overrides), also
    the theory panel ``theory/curves.csv`` and ``theory/theory.png``.

    The effects of every readout, then the figures, are shared among ``workers`` processes
    (:func:`analysis.sweep.run_parallel`; default: the usable CPUs); the tables are the same
    with any number."""
    from analysis.sweep import run_parallel
    if runs is not None:
        write_csv_atomic(d / "equal_steps.csv", equal_steps_table(runs, tuned))
    metrics = effect_metrics(per)
    effects_by = dict(zip(metrics, run_parallel([(effects_table, (per, tuned, m)) for m in metrics], workers)))
    by_metric = {m: effects_by[m] for m in ("pass1_at", "heldout_pass1_at", "pass1_auc") if m in effects_by}
    effects = pd.concat(list(by_metric.values()), ignore_index=True)
    cells = cells_table(per, effects, tuned)
    write_csv_atomic(d / "map.csv", map_table(per))
    write_csv_atomic(d / "effects.csv", effects)
    write_csv_atomic(d / "cells.csv", cells)
    write_csv_atomic(d / "readouts.csv", readouts_table(per, tuned, effects_by))
    figures = [(heatmaps, (cells, d / "heatmap.png"))]
    figures += [(waterfalls, (per, effects, tuned, u, d / f"waterfall_{u}.png")) for u in BUDGET_UNITS]
    if theory_spec is not None:
        from analysis.theory import figure, theory_table
        curves = theory_table(K=8, seed=0, spec=theory_spec)
        write_csv_atomic(d / "theory" / "curves.csv", curves)
        figures.append((figure, (curves, d / "theory" / "theory.png")))
    import matplotlib.pyplot  # noqa: F401  (once, here: the workers are forked with it)
    run_parallel(figures, workers)


def load(root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """``(per_run, tuned_lr, study.json)`` of the map under results directory ``root``."""
    d = Path(root) / STUDY
    meta = json.loads((d / "study.json").read_text()) if (d / "study.json").exists() else {}
    per, tuned = pd.read_csv(d / "per_run.csv"), pd.read_csv(d / "tuned_lr.csv")
    for frame, cols in ((per, ("reached", "lr_edge")), (tuned, ("chosen", "edge"))):
        for c in cols:
            frame[c] = _as_bool(frame[c], c)
    return per, tuned, meta


@dataclass(frozen=True)
class MapAnalysis:
    """A map's tables as the report reads them (:func:`analyse`): ``per`` and ``tuned`` as
    :func:`load` returns them, ``meta`` (``study.json``), ``effects`` (:func:`effects_table` by
    metric: the whole-budget pass@1 and every other readout present) and ``readouts``
    (:func:`readouts_table`). Read-only: every caller shares one instance."""

    per: pd.DataFrame
    tuned: pd.DataFrame
    meta: dict
    effects: dict[str, pd.DataFrame]
    readouts: pd.DataFrame


_ANALYSES: dict[tuple, MapAnalysis] = {}


def analyse(root: str | Path) -> MapAnalysis:
    """:class:`MapAnalysis` of the map under ``root``, computed once per version of its
    ``per_run.csv`` and ``tuned_lr.csv`` (the report and the README block share it)."""
    d = (Path(root) / STUDY).resolve()
    key = (str(d), *((d / f).stat().st_mtime_ns for f in ("per_run.csv", "tuned_lr.csv")))
    if key not in _ANALYSES:
        per, tuned, meta = load(root)
        effects = {m: effects_table(per, tuned, m) for m in effect_metrics(per)}
        _ANALYSES.clear()  # one map at a time
        _ANALYSES[key] = MapAnalysis(per, tuned, meta, effects, readouts_table(per, tuned, effects))
    return _ANALYSES[key]


def _as_bool(col: pd.Series, name: str) -> pd.Series:
    """A CSV column of booleans as bool (also when it reads back as the strings True/False)."""
    if col.dtype == bool:
        return col
    mapped = col.map({True: True, False: False, "True": True, "False": False, "true": True, "false": False})
    if mapped.isna().any():
        raise ValueError(f"column {name!r} holds values other than True/False: {sorted(set(col[mapped.isna()]))[:3]}")
    return mapped.astype(bool)


# ------------------------------------------------------------------------------------------
# the report


def _count(frame: pd.DataFrame, column: str, values: Sequence[str]) -> str:
    """``holds in 3/24 (tokens) + 2/24 (rollouts), ...``: each unit tallied on its own (the two units
    read the same runs, so their cells are not independent)."""
    units = [u for u in BUDGET_UNITS if (frame.unit == u).any()] if "unit" in frame else []
    parts = []
    for v in values:
        hit = frame[column] == v
        if not hit.any():
            continue
        if units:
            parts.append(f"{v} in " + " + ".join(
                f"{int((hit & (frame.unit == u)).sum())}/{int((frame.unit == u).sum())} ({u})" for u in units))
        else:
            parts.append(f"{v} in {int(hit.sum())}/{len(frame)}")
    return ", ".join(parts)


def _axis_breakdown(frame: pd.DataFrame, column: str, value: str) -> str:
    """``fatal 2/8, constant 5/8, ...`` per level of each axis: the cells where ``column == value``."""
    parts = []
    levels = {"spread": list(SPREADS), "recovery": list(RECOVERY), "learner": list(LEARNERS),
              "unit": list(BUDGET_UNITS)}
    for axis, lv in levels.items():
        parts.append(", ".join(f"{x} {int(((frame[axis] == x) & (frame[column] == value)).sum())}/"
                               f"{int((frame[axis] == x).sum())}" for x in lv if (frame[axis] == x).any()))
    return "; ".join(parts)


def _where(frame: pd.DataFrame, mask: pd.Series, limit: int = 12) -> str:
    sel = frame[mask]
    items = [f"{r.recovery}/{r.spread}/{r.learner}/{r.unit}" for r in sel.itertuples()]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return (", ".join(items[:limit]) + more) if items else "none"


def _material(cells: pd.DataFrame, tag: str, ceiling: pd.Series) -> str:
    """``higher by >= 0.02 in 3/24 (rollouts), 2/24 (tokens), lower by ...; of the significant ones at
    the ceiling: ...``, each unit on its own."""
    v, mat = cells[f"deep_minus_{tag}_verdict"], cells[f"deep_minus_{tag}_material"].astype(bool)
    sig = v.isin(["higher", "lower"])
    return (f"higher by at least the ±{EQUIVALENCE_MARGIN:g} margin in {_by_unit(cells, (v == 'higher') & mat)}, lower "
            f"by at least it in {_by_unit(cells, (v == 'lower') & mat)}; of the significant ones at the ceiling: "
            f"{_by_unit(cells, sig & ceiling)}")


def at_ceiling(per: pd.DataFrame, cells: pd.DataFrame) -> pd.Series:
    """Per row of ``cells``: every method of :data:`WINNER_POOL` has mean pass@1 at the budget of
    at least :data:`CEILING`."""
    low = per[per.name.isin(WINNER_POOL)].groupby([*CELL, "name"], sort=False).pass1_at.mean().groupby(
        list(CELL), sort=False).min()
    return pd.Series(low.reindex(pd.MultiIndex.from_frame(cells[list(CELL)])).to_numpy() >= CEILING,
                     index=cells.index)


def claim_table(effects: pd.DataFrame) -> pd.DataFrame:
    """One row per (claim, cell): the comparisons (difference [Holm interval] verdict), the
    claim's verdict (:func:`claim_verdict`) and, when it fails, ``why``: ``reversed`` (a
    comparison goes the other way) or ``no difference`` (every comparison is equivalent)."""
    e = effects[effects.metric == "pass1_at"]
    rows = []
    for c in CLAIMS:
        fam = e[e.family == f"claim {c.key}"]
        for key, g in fam.groupby(list(CELL), sort=False):
            verdict, why = _claim_verdict_why(c.rule, list(g.verdict))
            rows.append({"claim": c.key, **dict(zip(CELL, key)), "verdict": verdict, "why": why,
                         "comparisons": "; ".join(f"{o}: {d:+.3f} [{lo:+.3f}, {hi:+.3f}] {v}" for o, d, lo, hi, v in
                                                  zip(g.other, g["diff"], g.low, g.high, g.verdict))})
    return pd.DataFrame(rows)


def report_section(root: str | Path) -> list[str] | None:
    """The regime map's part of ``REPORT.md`` (markdown lines; None if the map was not run in
    ``root``): protocol, where DEEP-GRPO wins, which ladder step pays, the per-cell table, the
    theory panel, and one section per claim of the paper, all computed from ``per_run.csv`` and
    ``tuned_lr.csv``."""
    from analysis.tables import markdown_table
    d = Path(root) / STUDY
    if not (d / "per_run.csv").is_file():
        return None
    a = analyse(root)
    per, tuned, meta, effects = a.per, a.tuned, a.meta, a.effects["pass1_at"]
    cells = cells_table(per, effects, tuned)
    n_cells = len(cells)
    seeds = int(per.seed.nunique())
    ends = per.groupby("unit").budget.first()
    chosen = tuned[tuned.chosen.astype(bool)]
    edge = chosen[chosen.edge.astype(bool)]
    start = per[(per.unit == "tokens")].groupby(["spread", "recovery", "seed"], sort=False).pass1_start.first()
    ext = meta.get("size_config", {}).get("max_extensions", 0)
    tuning_seeds = ", ".join(map(str, meta.get("protocol", {}).get("tuning_seeds", [])))
    grid = (f"grids are extended by 2x past an end up to {2 ** ext}x beyond the base grid; beyond that the best rate "
            "may lie outside" if ext else "grids are not extended at this size: the best rate may lie outside")
    lines = [f"## {STUDY}", "",
             "*Question:* in which regime (spread of problem difficulty x recovery model x policy class and optimizer "
             "x budget unit) does DEEP-GRPO win, and which of its ingredients does the work?", "",
             f"{len(per) // 2 if len(BUDGET_UNITS) == 2 else len(per)} evaluation readings per unit: "
             f"{per.groupby(list(REGIME)).ngroups} regimes x {per.name.nunique()} methods x {seeds} seeds"
             + (f" ({meta.get('size', 'full')} size" + (f", {meta['wall_time_s']:.0f} s wall" if 'wall_time_s' in meta
                                                        else "") + f", {meta.get('tuning_runs', '?')} tuning runs and "
                f"{meta.get('evaluation_runs', '?')} evaluation runs)" if meta else "") + ".", "",
             "**Protocol**", "",
             f"- *Budgets:* every run stops at {int(ends['tokens']):,} generated tokens; it has then spent at least "
             f"{int(ends['rollouts']):,} rollouts (a rollout generates at most a whole chain), the rollout budget. "
             "Values are read at each budget from the run's curve; GRPO and root-only reach both budgets at the same "
             "step, suffix-only branching reaches the rollout budget earlier. "
             f"{int(per.reached.sum())} of {len(per)} readings reached their budget.",
             f"- *Seeds:* evaluation seeds {', '.join(map(str, sorted(per.seed.unique())))}, each with its own problem "
             f"set ({per.problem_set_seed.nunique()} distinct sets over the map); initial exact pass@1 of the training "
             "problems, mean (range) over seeds: " + "; ".join(
                 f"{r}, {sp}: {g.mean():.3f} ({g.min():.3f}-{g.max():.3f})"
                 for (sp, r), g in start.groupby(level=["spread", "recovery"], sort=False)) + ".",
             f"- *Learning rates:* tuned per regime, method and unit (criterion: mean AUC of training pass@1 over "
             f"[0, budget] in the unit) on tuning seeds {tuning_seeds}"
             f"; {len(edge)} of {int(tuned.chosen.astype(bool).sum())} chosen rates lie at the end of their grid "
             f"({grid}); by learner: " + ", ".join(
                 f"{lr} {int((edge.learner == lr).sum())}/{int((chosen.learner == lr).sum())}" for lr in LEARNERS)
             + "; by method family: " + ", ".join(
                 f"{f} {int((edge.family == f).sum())}/{int((chosen.family == f).sum())}"
                 for f in dict.fromkeys(m.family for m in METHODS))
             + ". The best GRPO-N of a cell is the N that tuned best (tuning seeds), so that its choice does not use "
             "the evaluation seeds.",
             f"- *Statistics:* paired differences over {seeds} seeds; within a cell, the two headline comparisons "
             "(DEEP-GRPO minus best GRPO-N and minus root-only) are one Holm family; `**` marks those also "
             f"significant under Holm over all {int((effects.family == 'headline').sum() // 2)} headline comparisons "
             f"of a unit (the whole map); *equivalent* needs TOST within ±{EQUIVALENCE_MARGIN:g} (its 90 % interval "
             "inside the margin, after Holm), so an equivalent difference's printed (Holm) interval may reach past it. "
             "Values: training exact pass@1 at the budget, and its AUC over [0, budget] in the cell's unit.", "",
             "![regime map](regime-map/heatmap.png)", ""]
    readouts = a.readouts
    if len(readouts):
        lines += headline_lines(per, tuned, readouts)
    lines += transfer_lines(a)
    lines += headroom_lines(a)
    # where DEEP-GRPO wins
    lines += ["**Where DEEP-GRPO wins** (every learner, training exact pass@1 at the budget)", ""]
    ceiling = at_ceiling(per, cells)
    for tag, what in (("best_grpo", "the best GRPO-N"), ("root_only", "root-only")):
        col = f"deep_minus_{tag}_verdict"
        lines.append(f"- DEEP-GRPO minus {what}: "
                     + _count(cells, col, ("higher", "lower", "equivalent", "inconclusive"))
                     + f" cells ({_material(cells, tag, ceiling)}); higher in: "
                       f"{_where(cells, cells[col] == 'higher')}; lower in: "
                       f"{_where(cells, cells[col] == 'lower')}. Higher by axis level: "
                     + _axis_breakdown(cells, col, "higher") + ". Lower by axis level: "
                     + _axis_breakdown(cells, col, "lower") + ". Map-wide Holm (per unit) keeps "
                     + f"{_by_unit(cells, cells[f'deep_minus_{tag}_map'].isin(['higher', 'lower']))}.")
    for metric, what in (("heldout_pass1_at", "held-out exact pass@1 at the budget"),
                         ("pass1_auc", "mean training pass@1 over [0, budget] (AUC)")):
        if metric in per:
            h = a.effects[metric]
            h = h[h.family == "headline"]
            parts = (("the best GRPO-N", h[h.other.str.startswith("grpo N=")]), ("root-only", h[h.other == ROOT_ONLY]))
            lines.append(f"- On {what}: " + "; ".join(
                f"DEEP-GRPO minus {name} higher in {int((g.verdict == 'higher').sum())}/{len(g)}, lower in "
                f"{int((g.verdict == 'lower').sum())}/{len(g)}" for name, g in parts) + ".")
    lines.append(f"- At the ceiling (every method of GRPO-N and the ladder has mean pass@1 >= {CEILING:g} at the "
                 f"budget, so no method can show a gain): {int(ceiling.sum())}/{n_cells} cells: "
                 f"{_where(cells, ceiling)}.")
    wins = cells.winner.value_counts()
    lines.append("- Winner among GRPO-N and the ladder (highest mean on the evaluation seeds, then tested against the "
                 "others on the same seeds, so 'significantly above' is optimistic; ties = methods not significantly "
                 "below it): "
                 + ", ".join(f"{w} in {n}/{n_cells}" for w, n in wins.items())
                 + f"; the winner is significantly above every other method in {int((cells.tied == 0).sum())}/{n_cells}"
                   " cells.")
    lad = effects[(effects.metric == "pass1_at") & (effects.family == "ladder")]
    lines += ["", "**Which ladder step pays** (each rung minus the one below, Holm over the 7 steps within a cell)", ""]
    for name, g in lad.groupby("comparison", sort=False):
        rung = name.split(" minus ")[0]
        lines.append(f"- {name} (adds {LADDER[rung]}): higher in {int((g.verdict == 'higher').sum())}/{len(g)}, "
                     f"lower in {int((g.verdict == 'lower').sum())}/{len(g)}; mean step {g['diff'].mean():+.3f} "
                     f"(range {g['diff'].min():+.3f} to {g['diff'].max():+.3f}); higher where: "
                     f"{_where(g, g.verdict == 'higher', 6)} (by axis level: "
                     f"{_axis_breakdown(g, 'verdict', 'higher')}).")
    land = per[per.unit == "tokens"].groupby("name").pivot_oracle_success.mean()
    ladder_land = [(n, land.get(n, np.nan)) for n in LADDER if n != BEST_GRPO]
    lines.append("- Exact P(success | branch prefix) of the branch points, mean over the map (tokens): "
                 + "; ".join(f"{n} {x:.3f}" for n, x in ladder_land if np.isfinite(x)) + ".")
    if len(readouts):
        head = pd.Series(headline_readouts(per)).map(READOUTS).value_counts()
        lines += ["", "**How the verdicts move with the readout** (every learner; cells where the first method is "
                  f"significantly better / worse than the second, of the {n_cells // len(BUDGET_UNITS)} cells of "
                  "each unit; Holm within each cell and readout; pass@1 at 1/8, "
                  "1/4, 1/2 and the whole budget, its AUC, and the budget needed to get halfway from the run's start "
                  "to pass@1 = 1, where less is better and a run that never gets there counts as the whole budget). "
                  "The *headline readout* of a cell is fixed by a rule before any comparison: the largest of the four "
                  f"budgets at which the best method's mean pass@1 is still below {HEADLINE_SATURATION:g}, so that it "
                  "is not saturated there (the smallest budget if it is at all four); it is "
                  + ", ".join(f"{label} in {k}" for label, k in head.items()) + f" of the {n_cells} cells. "
                  f"*MDE*: the minimum detectable effect of a comparison, the true difference in pass@1 its paired "
                  f"t-test would find with {POWER:.0%} power at Holm's strictest level in its family, at the spread "
                  "of the observed differences; a true effect below it is more likely missed than found. *Pooled*: "
                  "the mean over the regimes of each cell's mean difference at its headline readout, with a 95 % "
                  "t-interval over the regimes (the regime as block), in each unit on its own (the two units read "
                  "the same runs, so they are not independent).", ""]
        lines += readout_lines(readouts, n_cells)
    lines += ["", "![ladder, tokens](regime-map/waterfall_tokens.png)", "",
              "![ladder, rollouts](regime-map/waterfall_rollouts.png)", "", "**Cells**", ""]
    show = cells.assign(**{
        "DEEP − best GRPO-N": [f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}] {v}{'**' if m in ('higher', 'lower') else ''}"
                               for d, lo, hi, v, m in zip(cells.deep_minus_best_grpo, cells.deep_minus_best_grpo_low,
                                                          cells.deep_minus_best_grpo_high,
                                                          cells.deep_minus_best_grpo_verdict,
                                                          cells.deep_minus_best_grpo_map)],
        "DEEP − root-only": [f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}] {v}{'**' if m in ('higher', 'lower') else ''}"
                             for d, lo, hi, v, m in zip(cells.deep_minus_root_only, cells.deep_minus_root_only_low,
                                                        cells.deep_minus_root_only_high,
                                                        cells.deep_minus_root_only_verdict,
                                                        cells.deep_minus_root_only_map)]})
    lines += [markdown_table(show[[*CELL, "winner", "winner_pass1", "tied", "best_N", "DEEP − best GRPO-N",
                                   "DEEP − root-only"]]), ""]
    theory = d / "theory" / "curves.csv"
    if theory.is_file():
        from analysis.theory import section
        lines += section(pd.read_csv(theory), 8, heading="### Theory panel (exact, pre-trained policy, evaluation "
                         "seed 0's problem set of each spread x recovery)", image="regime-map/theory/theory.png")
    lines += claims_section(effects)
    if (d / "equal_steps.csv").is_file():
        lines += saturation_lines(saturation_table(pd.read_csv(d / "equal_steps.csv")))
    return lines


def claims_section(effects: pd.DataFrame) -> list[str]:
    """One section per claim of the paper: the rule, where it holds and fails (counts, by axis
    level, and every cell)."""
    from analysis.tables import markdown_table
    table = claim_table(effects)
    lines = ["### The paper's claims, regime by regime", "",
             "Each claim is a family of paired comparisons per cell (training pass@1 at the budget, Holm within the "
             "family). *holds*: every comparison is higher (for (a): N = 64 is lower than or equivalent to N = 32); "
             "*fails*: one is lower, or all are equivalent (for (a): N = 64 is higher); *partly*: some higher, none "
             "lower; *inconclusive*: otherwise.", ""]
    for c in CLAIMS:
        t = table[table.claim == c.key]
        lines += [f"#### ({c.key}) {c.title}", "", f"*Tested:* {c.paper}.", "",
                  f"- {_count(t, 'verdict', VERDICTS)} cells.",
                  f"- Holds in: {_where(t, t.verdict == 'holds')}. By axis level: "
                  f"{_axis_breakdown(t, 'verdict', 'holds')}.",
                  f"- Fails, reversed (a comparison goes the other way), in: {_where(t, t.why == 'reversed')}. By axis "
                  f"level: {_axis_breakdown(t, 'why', 'reversed')}.",
                  f"- Fails, no difference (every comparison equivalent within ±{EQUIVALENCE_MARGIN:g}), in: "
                  f"{_where(t, t.why == 'no difference')}.",
                  "", markdown_table(t[[*CELL, "verdict", "why", "comparisons"]]), ""]
    return lines


def _by_unit(frame: pd.DataFrame, mask: pd.Series) -> str:
    """``14/24 (tokens), 8/24 (rollouts)``: the rows where ``mask`` holds, each unit on its own."""
    return ", ".join(f"{int((mask & (frame.unit == u)).sum())}/{int((frame.unit == u).sum())} ({u})"
                     for u in BUDGET_UNITS if (frame.unit == u).any())


def readme_block(root: str | Path) -> str:
    """The README's simulator results (markdown), computed from the map in ``root``: the headline
    (:func:`headline_table`), the tabular sanity check, then every learner at the whole budget."""
    a = analyse(root)
    per, tuned, meta, effects, readouts = a.per, a.tuned, a.meta, a.effects["pass1_at"], a.readouts
    cells = cells_table(per, effects, tuned)
    table = claim_table(effects)
    n = len(cells)
    ends = per.groupby("unit").budget.first()
    out = [f"Regime map ({per.groupby(list(REGIME)).ngroups} regimes x 2 budget units = {n} cells; "
           f"{per.name.nunique()} methods, {per.seed.nunique()} seeds with their own problem sets, rates tuned per "
           f"cell; {int(ends['tokens']):,} tokens / {int(ends['rollouts']):,} rollouts per run"
           + (f"; {meta['wall_time_s'] / 60:.1f} min of wall time in all" if 'wall_time_s' in meta else "") + ").", ""]
    eq = Path(root) / STUDY / "equal_steps.csv"
    sat = saturation_table(pd.read_csv(eq)) if eq.is_file() else None
    if len(readouts):
        ht = headline_table(readouts)
        edge, n_rates = headline_rates(tuned)
        out += [f"**Headline** ({' and '.join(HEADLINE_LEARNERS)}, each cell at its headline readout: the largest of "
                f"1/8, 1/4, 1/2 and the whole budget where the best method's mean pass@1 is below "
                f"{HEADLINE_SATURATION:g}; better/worse = cells significant either way of the regimes of one unit; "
                "pooled = mean over regimes, 95 % t-interval, regime as block; MDE = minimum detectable effect, "
                f"{POWER:.0%} power, median (range) over cells; {edge} of {n_rates} chosen rates at a grid edge):", ""]
        for kind in ("headline", "ladder"):
            for what, g in ht[ht.kind == kind].groupby("what", sort=False):
                label = (what.replace(DEEP, "DEEP-GRPO").replace(" minus ", " vs ") if kind == "headline"
                         else f"ladder step {what.replace(' minus ', ' over ')}")
                out.append(f"- {label}: " + "; ".join(f"{r.unit} {_headline_comparison(r)}"
                                                      for r in g.itertuples()) + ".")
        for what, g in ht[ht.kind == "claim"].groupby("what", sort=False):
            out.append(f"- {what}: " + "; ".join(f"{r.unit} {r.verdicts} of {int(r.cells)} cells, pooled "
                                                 f"{r.pooled_verdict} ({r.pooled})" for r in g.itertuples()) + ".")
        if sat is not None:
            fs = sat[sat.learner.isin(HEADLINE_LEARNERS)]
            claims = fs.groupby(list(REGIME), sort=False).claim.first()
            pooled = "; ".join(f"{inc} {e.mean:+.3f} [{e.low:+.3f}, {e.high:+.3f}]" for inc, e in
                               ((inc, mean_ci(g['diff'].to_numpy(np.float64))) for inc, g in
                                fs.groupby("increment", sort=False)))
            out.append("- (a) root saturation as the paper states it, at equal steps (increments of pass@1 from N = 8 "
                       "to 16, 32, 64 positive and shrinking): " + ", ".join(
                           f"{v} {k}/{len(claims)}" for v, k in claims.value_counts().items())
                       + f" regimes; pooled increments {pooled}.")
        out += [f"- {sanity_line(per, tuned, readouts)}", ""]
    out += transfer_summary(a)
    out += ["Every learner, read at the whole budget (counts per unit: the two units read the same runs):", ""]
    ceiling = at_ceiling(per, cells)
    for tag, what in (("best_grpo", "the best GRPO-N"), ("root_only", "root-only")):
        col = f"deep_minus_{tag}_verdict"
        out.append(f"- DEEP-GRPO vs {what}: higher in {_by_unit(cells, cells[col] == 'higher')}, lower in "
                   f"{_by_unit(cells, cells[col] == 'lower')}, equivalent in "
                   f"{_by_unit(cells, cells[col] == 'equivalent')} (Holm within each cell; map-wide Holm, per "
                   "unit, keeps "
                   f"{_by_unit(cells, cells[f'deep_minus_{tag}_map'].isin(['higher', 'lower']))}; "
                   f"{_material(cells, tag, ceiling)}). Higher by level: "
                   + _axis_breakdown(cells, col, "higher") + ".")
    wins = cells.winner.value_counts()
    out.append("- Winner (highest mean among GRPO-N and the ladder): "
               + ", ".join(f"{w} {k}/{n}" for w, k in wins.items())
               + f"; {int(ceiling.sum())}/{n} cells are at the ceiling (every one of those methods "
               f">= {CEILING:g}).")
    lad = effects[(effects.metric == "pass1_at") & (effects.family == "ladder")]
    out.append("- Ladder steps significantly up / down: "
               + "; ".join(f"{name.split(' minus ')[0]} " + ", ".join(
                   f"{int(((g.unit == u) & (g.verdict == 'higher')).sum())}/"
                   f"{int(((g.unit == u) & (g.verdict == 'lower')).sum())} ({u})" for u in BUDGET_UNITS)
                   for name, g in lad.groupby("comparison", sort=False)) + ".")
    if len(readouts):
        deep = readouts[readouts.pair == f"{DEEP} minus {BEST_GRPO}"]
        parts = [f"{label} {_tally(g)}" for label, g in deep.groupby("readout", sort=False)]
        h = deep[deep.headline]
        out.append("- By readout, DEEP-GRPO vs the best GRPO-N significantly better/worse: " + "; ".join(parts)
                   + f"; at each cell's headline readout {_tally(h)}, with a minimum detectable effect "
                   f"({POWER:.0%} power) of {_median_range(h.mde)} in pass@1 (median and range over cells).")
    for c in CLAIMS:
        t = table[table.claim == c.key]
        out.append(f"- ({c.key}) {c.title}, at the budget: " + _count(t, "verdict", VERDICTS) + " (fails: "
                   f"{int((t.why == 'reversed').sum())} reversed, {int((t.why == 'no difference').sum())} no "
                   "difference); holds by level: " + _axis_breakdown(t, "verdict", "holds") + ".")
    if sat is not None:
        claims = sat.groupby(list(REGIME), sort=False).claim.first()
        pooled = "; ".join(f"{inc} {mean_ci(g['diff'].to_numpy(np.float64)).mean:+.3f}"
                           for inc, g in sat.groupby("increment", sort=False))
        out.append("- (a) as the paper states it, at equal steps, every learner: " + ", ".join(
            f"{v} {k}/{len(claims)}" for v, k in claims.value_counts().items())
                   + f" regimes; mean increments over the regimes {pooled}.")
    return "\n".join(out)


README_BEGIN = "<!-- regime-map:begin (generated by `deepgrpo report --results DIR --readme README.md`) -->"
README_END = "<!-- regime-map:end -->"


def update_readme(readme: str | Path, root: str | Path) -> Path:
    """Replace the text between :data:`README_BEGIN` and :data:`README_END` in ``readme`` with
    :func:`readme_block` of ``root`` (atomic)."""
    path = Path(readme)
    text = path.read_text()
    if text.count(README_BEGIN) != 1 or text.count(README_END) != 1:
        raise ConfigError(f"--readme {path}: expected one line '{README_BEGIN}' and one '{README_END}'",
                          owner="--readme", value=str(path))
    head, rest = text.split(README_BEGIN)
    _, tail = rest.split(README_END)
    write_text_atomic(path, f"{head}{README_BEGIN}\n{readme_block(root)}\n{README_END}{tail}")
    return path


# ------------------------------------------------------------------------------------------
# command line


DESCRIPTION = ("In which regime DEEP-GRPO wins, and which of its ingredients does the work: GRPO-N, the "
               "decomposition ladder and tree baselines in every regime (problem spread x recovery model x "
               "learner, read in tokens and in rollouts), each method's learning rate tuned on tuning seeds.")
"""What ``deepgrpo study regime-map`` does, for its ``--help``."""


@dataclass
class RegimeMapOptions:
    """Settings of the regime map.

    seeds: paired evaluation seeds per method (at least 2 for paired intervals, at most 1000:
        evaluation seeds stay below the tuning seeds; None = 20, or 2 with --quick).
    workers: processes running the map's runs (None = the CPUs this process may use, also the
        most it takes).
    """

    seeds: int | None = None
    workers: int | None = None

    def __post_init__(self) -> None:
        if self.seeds is not None:
            check_range(type(self).__name__, "seeds", self.seeds, 2, TUNING_SEED_BASE, integer=True)
        if self.workers is not None:
            check_range(type(self).__name__, "workers", self.workers, 1, None, integer=True)


OPTIONS = OptionSet(RegimeMapOptions, reserved=("quick", "out", "no_progress", "config", "set", "help"))


def add_arguments(p: Any) -> None:
    """The options of ``deepgrpo study regime-map`` (on parser ``p``)."""
    p.add_argument("--quick", action="store_true", help="the tests' size: 8 problems, 2,000 tokens per run, two rates "
                   "on one tuning seed, two evaluation seeds (about 15 s on 2 cores)")
    p.add_argument("--out", default="results", help="results directory (default: ./results)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    OPTIONS.add_arguments(p)


def main(argv: Sequence[str], prog: str = f"deepgrpo study {STUDY}") -> int:
    """Entry point of ``deepgrpo study regime-map``."""
    from analysis.sweep import cap_workers
    from deepgrpo.records import claim_output
    p = OneLineParser(prog=prog, description=DESCRIPTION)
    add_arguments(p)
    a = p.parse_args(list(argv))
    opts = OPTIONS.resolve_named(a, RegimeMapOptions())
    claim_output(a.out)
    workers = cap_workers(opts.workers, prog)
    t0 = time.perf_counter()
    d = run_regime_map(a.out, seeds=opts.seeds, size="quick" if a.quick else "full", workers=workers,
                       progress=not a.no_progress)
    print(f"{STUDY}: {d} ({time.perf_counter() - t0:.1f} s); `deepgrpo report --results {a.out}` writes the report",
          file=sys.stdout)
    return 0
