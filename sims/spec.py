"""The token-tree MDP: its specification (:class:`TokenTreeSpec`) and one drawn problem set
(:class:`ProblemSet`).

A *problem* p is a chain of ``L_p`` steps (``L_p = depth`` for every problem, or drawn
uniformly in ``[min_depth, depth]`` per problem); at each step the policy emits one token from a
vocabulary of ``V = vocab_size`` tokens. Each (problem, step) has one correct token. Tensors
are laid out over ``T = depth`` steps; steps ``t >= L_p`` of a shorter problem are padding that
no chain ever visits. The state before step t is ``(problem, t, status)`` with status ∈
{:data:`ON_TRACK`, :data:`DERAILED`}:

* on-track + correct token  -> on-track; on-track + any other token -> derailed;
* derailed + the step's correct ("recovery") token -> on-track if the recovery model allows
  recovery (``fatal``: never; ``constant`` / ``decay``: always), else derailed;
* derailed + any other token -> derailed.

Reward 1 iff the chain is on track after its last step ``L_p``. The status is a deterministic function of
(problem, prefix tokens), so a continuation from exact prefix tokens replays the same state
(what the core's branching relies on).

How recoverable a derailed chain is lives in the *pre-trained* policy's derailed-state
logits: P(recovery token | derailed, p, t) = ρ(t) · P(correct | on-track, p, t), "notice the
mistake (ρ) and do the step right" — so a derailed chain cannot dodge a crux by recovering at
it more easily than an on-track one passes it. ``constant``: ρ(t) = ρ; ``decay``:
ρ(t) = ρ · exp(-recovery_decay · t / L_p) (late errors are harder to repair). Under ``fatal``
the recovery token does nothing (and the derailed logits are uniform).

The pre-trained policy's on-track correctness at step t of problem p is
``σ(a_p - Σ_c h_c · [t == t_c])``: an ability offset a_p per problem and a few *crux* steps
t_c with hardness h_c (paper arXiv 2602.14169, §1/§4: hard problems fail at a few deep steps,
so root sampling gives all-fail groups while a pivot just before the crux re-enters it).
``heterogeneity`` scales the between-problem differences of the cruxes (positions and
hardness) from 0 (shared) to 1 (independent draws); abilities vary by ``ability_std``.

Problem sets (the DESIGN's study protocol): a set holds ``n_problems`` training problems and
``n_heldout`` held-out problems drawn from the same distribution and never trained on. It is
drawn from the *problem-set seed*: ``TokenTreeSpec.seed`` when pinned, else one derived from
the run seed (:meth:`TokenTreeSpec.problem_set_seed`), so each run seed trains on its own set.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deepgrpo.config import check_choice, check_range, dataclass_from_dict, invalid

ON_TRACK = 0
"""Status index of an on-track chain."""
DERAILED = 1
"""Status index of a derailed chain."""

RECOVERY_MODELS = ("fatal", "constant", "decay")
"""Recovery models of derailed chains (see the module docstring)."""

MIN_PROB = 1e-6
"""Floor on the pre-trained policy's token probabilities (keeps every logit finite)."""


@dataclass
class TokenTreeSpec:
    """Everything that defines a simulated problem set (validated at construction).

    Chain
        depth: T, steps per problem (one token per step); the longest length when ``min_depth``
            is set.
        min_depth: None = every problem has ``depth`` steps; else each problem's length is drawn
            uniformly in [min_depth, depth] (token budgets, Dr.GRPO's normaliser and relative
            depth then mean what they mean for an LLM).
        vocab_size: V >= 2 tokens per step; exactly one is correct.
        n_problems: training problems in the set (the "dataset").
        n_heldout: held-out problems drawn with the set (same distribution), never trained on;
            their exact pass@1 / pass@k are logged beside the training problems' (0 = none).
        segment_len: steps per segment, the unit of candidate pivots (paper §3.2: an LLM
            cuts at sentences/lines; the simulator at steps). The last segment may be shorter.
    Base ("pre-trained") policy
        ability_mean: mean of a problem's ability a_p, the logit of per-step correctness
            (a_p ~ N(ability_mean, ability_std²)).
        ability_std: spread of the problems' abilities a_p across problems.
        n_crux: crux steps per problem.
        crux_depth_low: shallowest relative depth t/L_p of a crux step (crux positions are drawn
            uniformly in [crux_depth_low, crux_depth_high]; deep by default: the paper's
            failures happen late).
        crux_depth_high: deepest relative depth t/L_p of a crux step.
        crux_hardness_mean: mean of the logits subtracted at a crux step (its hardness, drawn
            ~ N(crux_hardness_mean, (h·crux_hardness_std)²) and clipped at 0).
        crux_hardness_std: spread of the crux hardness across problems (scaled by h).
        heterogeneity: h ∈ [0, 1] scales how much crux positions and hardness vary between
            problems: each problem's crux sits at ``shared + h·(own - shared)`` where the shared
            layout spaces the cruxes evenly over [crux_depth_low, crux_depth_high] with the mean
            hardness, and ``own`` is an independent per-problem draw (0: identical cruxes;
            1: independent ones).
            At h = 0 the first error's depth is the same for every problem, the case where the
            paper's position-only estimator P̂(success | r) is exact; the recoverability study
            varies it.
    Recovery of derailed chains
        recovery: ``fatal`` | ``constant`` | ``decay``.
        recovery_prob: ρ, the base policy's chance to notice a mistake: P(recovery token |
            derailed, t) = ρ(t) · P(correct | on-track, t) (ρ(0) for decay).
        recovery_decay: rate of ``decay``: ρ(t) = ρ · exp(-recovery_decay · t / L_p).
    Skills (what problems share; read by the ``skills`` policy, :mod:`sims.policy`)
        n_skills: 0 = no skills (every step's correct token is an independent draw); else every
            step of every problem calls on one of ``n_skills`` shared *skills* (drawn uniformly
            per step), the competence a step needs, which a policy may observe (an LLM sees what
            kind of step it faces) without being told the correct token. Each skill has one token
            (drawn uniformly), and a step's correct token is its skill's with chance
            ``skill_consistency``. Training and held-out problems draw from the same skills, so
            learning a skill on training problems can help held-out problems never trained on.
        skill_consistency: c, how much transfers against how much interferes: a step's correct
            token is its skill's token with chance c and one of the V - 1 others (uniformly)
            otherwise. c = 1: every step of a skill has the same correct token (learning a skill
            transfers fully); c = 1/V: correct tokens are independent of skills (shared learning
            only interferes, like the ``features`` policy's random features); in between, a mix.
    seed: problem-set seed (correct tokens, abilities, cruxes, lengths). None = derived from
        the run seed, so every run seed draws its own problem set; an integer pins one set for
        every run seed. The policy class is a setting of the training loop
        (:class:`sims.runner.RunnerConfig`), not of the problem set.

    Defaults (the problem set of ``deepgrpo sim compare``): 32 training and 16 held-out
    problems of 12 steps over 4 tokens; easy steps are right with probability σ(4.5 ± 1) ≈ 0.99,
    and two crux steps per problem sit in the deep half of the chain (relative depth 0.5-1) with
    hardness 5 ± 1.5 logits, so a crux is passed with probability σ(a_p - h_c), from below 0.01
    to above 0.9 across problems; errors are fatal; problems differ fully (h = 1). The
    pre-trained exact pass@1 of the training problems is 0.18 ± 0.04 over problem sets (run
    seeds 0-19: 0.11 to 0.27) and about half of GRPO's N = 8 groups fail entirely (no signal) at
    the start — the paper's setting of hard problems failing at a few deep steps. The regime where the
    paper's position-only estimator is exact is h = 0 (see ``heterogeneity``).
    """

    depth: int = 12
    min_depth: int | None = None
    vocab_size: int = 4
    n_problems: int = 32
    n_heldout: int = 16
    segment_len: int = 1
    ability_mean: float = 4.5
    ability_std: float = 1.0
    n_crux: int = 2
    crux_depth_low: float = 0.5
    crux_depth_high: float = 1.0
    crux_hardness_mean: float = 5.0
    crux_hardness_std: float = 1.5
    heterogeneity: float = 1.0
    recovery: str = "fatal"
    recovery_prob: float = 0.3
    recovery_decay: float = 2.0
    n_skills: int = 0
    skill_consistency: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        o = type(self).__name__
        check_range(o, "depth", self.depth, 1, None, integer=True)
        if self.min_depth is not None:
            check_range(o, "min_depth", self.min_depth, 1, self.depth, integer=True)
        check_range(o, "vocab_size", self.vocab_size, 2, None, integer=True)
        check_range(o, "n_problems", self.n_problems, 1, None, integer=True)
        check_range(o, "n_heldout", self.n_heldout, 0, None, integer=True)
        check_range(o, "segment_len", self.segment_len, 1, None, integer=True)
        check_range(o, "ability_mean", self.ability_mean, -20.0, 20.0)
        check_range(o, "ability_std", self.ability_std, 0.0, None)
        check_range(o, "n_crux", self.n_crux, 0, None, integer=True)
        check_range(o, "crux_depth_low", self.crux_depth_low, 0.0, 1.0)
        check_range(o, "crux_depth_high", self.crux_depth_high, 0.0, 1.0)
        if self.crux_depth_high < self.crux_depth_low:
            raise invalid(o, "crux_depth_high", self.crux_depth_high,
                          f"a number in [crux_depth_low = {self.crux_depth_low}, 1.0]")
        check_range(o, "crux_hardness_mean", self.crux_hardness_mean, 0.0, None)
        check_range(o, "crux_hardness_std", self.crux_hardness_std, 0.0, None)
        check_range(o, "heterogeneity", self.heterogeneity, 0.0, 1.0)
        check_choice(o, "recovery", self.recovery, RECOVERY_MODELS)
        check_range(o, "recovery_prob", self.recovery_prob, 0.0, 1.0)
        check_range(o, "recovery_decay", self.recovery_decay, 0.0, None)
        check_range(o, "n_skills", self.n_skills, 0, None, integer=True)
        check_range(o, "skill_consistency", self.skill_consistency, 0.0, 1.0)
        if self.seed is not None:
            check_range(o, "seed", self.seed, 0, None, integer=True)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (JSON-ready)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TokenTreeSpec:
        """Inverse of :meth:`to_dict` through the typed path (unknown keys are errors)."""
        return dataclass_from_dict(cls, d)

    @property
    def pinned(self) -> bool:
        """Whether the problem set is pinned (``seed`` set) rather than drawn per run seed."""
        return self.seed is not None

    def problem_set_seed(self, run_seed: int = 0) -> int:
        """The effective problem-set seed of a run with ``run_seed``: ``seed`` if pinned, else
        an integer derived from the run seed by ``np.random.SeedSequence`` (a child stream of
        the run seed distinct from the runner's sampling streams, :func:`sims.runner.run_streams`)."""
        if self.seed is not None:
            return int(self.seed)
        return derived_problem_set_seed(run_seed)

    def build(self, run_seed: int = 0) -> ProblemSet:
        """Draw the problem set of a run with ``run_seed`` (deterministic in
        :meth:`problem_set_seed`; a pinned ``seed`` ignores ``run_seed``). Sizes whose tables
        cannot fit in memory are a :class:`~deepgrpo.config.ConfigError` before anything is
        drawn (:func:`sims.memory.check_fits`)."""
        from sims.memory import check_fits
        check_fits(self)
        seed = self.problem_set_seed(run_seed)
        key = (tuple(getattr(self, f.name) for f in dataclasses.fields(self)), seed)  # every field is a scalar
        hit = _PROBLEM_SETS.get(key)
        if hit is None:
            hit = _PROBLEM_SETS[key] = ProblemSet.from_spec(self, seed)
            if len(_PROBLEM_SETS) > PROBLEM_SET_CACHE:
                _PROBLEM_SETS.popitem(last=False)
        else:
            _PROBLEM_SETS.move_to_end(key)
        return hit


SKILLS_DEFAULTS: dict[str, Any] = {"n_skills": 16, "skill_consistency": 0.85}
"""The problem set of the ``skills`` policy's studies (TokenTreeSpec overrides; the spec's own
default has no skills, so that every other study's problem sets stay as they were). At these
settings and the other defaults, GRPO N = 8 (Adam lr 0.2) raises held-out pass@1 from 0.166 to
0.307 at 100,000 tokens (20 seeds; ``tests/test_sims_skills.py`` checks the pattern)."""


PROBLEM_SET_CACHE = 512
"""Problem sets kept per process (:meth:`TokenTreeSpec.build` returns the same object for the same
spec and seed: treat a problem set as read-only)."""
_PROBLEM_SETS: OrderedDict = OrderedDict()


PROBLEM_SET_STREAM = 3
"""Index of the problem-set stream among the children of ``SeedSequence(run_seed)`` (children
0-2 are the runner's sampling, batch and core streams)."""


def derived_problem_set_seed(run_seed: int) -> int:
    """The problem-set seed (an integer in [0, 2^32)) of run seed ``run_seed`` when the spec does
    not pin one: child :data:`PROBLEM_SET_STREAM` of ``np.random.SeedSequence(run_seed)``."""
    child = np.random.SeedSequence(int(run_seed)).spawn(PROBLEM_SET_STREAM + 1)[PROBLEM_SET_STREAM]
    return int(child.generate_state(1, np.uint32)[0])


@dataclass
class ProblemSet:
    """One drawn problem set: the MDP's constants as tensors (n = n_train + n_heldout problems,
    T = depth steps, V tokens). Problems ``0 .. n_train-1`` are the training problems, the rest
    the held-out ones.

    correct: ``LongTensor [n, T]`` correct (and recovery) token of each step.
    p_correct: ``DoubleTensor [n, T]`` base policy's P(correct token | on-track).
    p_recover: ``DoubleTensor [n, T]`` base policy's P(recovery token | derailed) = ρ(t)·p_correct
        (1/V if fatal).
    recovery_allowed: ``BoolTensor [T]`` whether the recovery token brings a derailed chain
        back on track at step t (all False for ``fatal``); ``[n, T]`` (per problem) in a stack
        of runs with different rules (:meth:`stack`).
    ability: ``DoubleTensor [n]``; crux_step: ``LongTensor [n, n_crux]``;
    crux_hardness: ``DoubleTensor [n, n_crux]``.
    skill: ``LongTensor [n, T]`` the skill each step calls on (``TokenTreeSpec.n_skills``), -1
        everywhere in a set without skills.
    lengths: ``LongTensor [n]`` steps L_p of each problem (all T unless ``min_depth`` is set).
    segment_ends: list of n ``LongTensor [S_p]``: exclusive segment ends of each problem (every
        ``segment_len`` steps, last = L_p).
    n_train: number of training problems.
    seed: the problem-set seed it was drawn from.
    """

    spec: TokenTreeSpec
    correct: torch.Tensor
    p_correct: torch.Tensor
    p_recover: torch.Tensor
    recovery_allowed: torch.Tensor
    ability: torch.Tensor
    crux_step: torch.Tensor
    crux_hardness: torch.Tensor
    lengths: torch.Tensor
    segment_ends: list[torch.Tensor]
    n_train: int
    seed: int
    skill: torch.Tensor

    @property
    def n(self) -> int:
        """All problems (training and held-out)."""
        return int(self.correct.shape[0])

    @property
    def n_heldout(self) -> int:
        return self.n - self.n_train

    @property
    def T(self) -> int:
        """Steps of the longest problem (the tensors' step dimension)."""
        return int(self.correct.shape[1])

    @property
    def V(self) -> int:
        return self.spec.vocab_size

    @property
    def variable_length(self) -> bool:
        """Whether some problem is shorter than T (the sampler then masks padding steps)."""
        return bool((self.lengths.numpy() < self.T).any())

    @functools.cached_property
    def correct_steps(self) -> np.ndarray:
        """``int64 ndarray [T, n]`` the correct tokens, step-major (the sampler's layout; computed
        once per set: its tensors are never written)."""
        return np.ascontiguousarray(self.correct.numpy().T)

    def step_mask(self) -> torch.Tensor:
        """``BoolTensor [n, T]`` True on the steps t < L_p a chain of problem p visits."""
        return torch.arange(self.T).unsqueeze(0) < self.lengths.unsqueeze(1)

    @classmethod
    def from_spec(cls, spec: TokenTreeSpec, seed: int) -> ProblemSet:
        """Draw the problem set of ``spec`` from problem-set seed ``seed``: the training problems
        from ``default_rng(seed)``, the held-out ones from an independent stream
        ``default_rng([seed, 1])`` (so the training problems do not depend on ``n_heldout``)."""
        train = _draw_problems(spec, np.random.default_rng(seed), spec.n_problems)
        held = _draw_problems(spec, np.random.default_rng([seed, 1]), spec.n_heldout)
        if spec.n_skills:  # skills from streams of their own: the draws above are those of a set without
            skill_token = np.random.default_rng([seed, SKILL_STREAM]).integers(0, spec.vocab_size, spec.n_skills)
            for part, stream in ((train, SKILL_STREAM + 1), (held, SKILL_STREAM + 2)):
                part["skill"], part["correct"] = _draw_skills(spec, np.random.default_rng([seed, stream]),
                                                              part["correct"].shape[0], skill_token)
        d = {k: np.concatenate([train[k], held[k]]) for k in train}
        T, V = spec.depth, spec.vocab_size
        lengths = d["lengths"]  # [n]
        steps = np.arange(T)
        if spec.recovery == "fatal":
            p_recover = np.full(d["p_correct"].shape, 1.0 / V)
            allowed = np.zeros(T, dtype=bool)
        else:
            rate = spec.recovery_decay if spec.recovery == "decay" else 0.0
            rho = spec.recovery_prob * np.exp(-rate * steps[None, :] / lengths[:, None])  # [n, T]
            p_recover = rho * d["p_correct"]  # [n, T]
            allowed = np.ones(T, dtype=bool)
        p_recover = np.clip(p_recover, MIN_PROB, 1.0 - MIN_PROB)
        S = spec.segment_len
        by_length: dict[int, torch.Tensor] = {}  # problems of one length share their (read-only) segment ends
        for L in dict.fromkeys(lengths.tolist()):
            by_length[L] = torch.from_numpy(np.unique(np.minimum(np.arange(S, L + S, S), L))).long()
        ends = [by_length[L] for L in lengths.tolist()]
        return cls(spec=spec, correct=torch.from_numpy(d["correct"]).long(),
                   p_correct=torch.from_numpy(d["p_correct"]), p_recover=torch.from_numpy(p_recover),
                   recovery_allowed=torch.from_numpy(allowed), ability=torch.from_numpy(d["ability"]),
                   crux_step=torch.from_numpy(d["crux_step"]), crux_hardness=torch.from_numpy(d["hardness"]),
                   lengths=torch.from_numpy(lengths).long(), segment_ends=ends, n_train=spec.n_problems,
                   seed=int(seed), skill=torch.from_numpy(d.get("skill", np.full((len(lengths), T), -1))).long())

    @classmethod
    def stack(cls, sets: Sequence[ProblemSet]) -> ProblemSet:
        """The problem sets of R runs as one set of R·n problems (run r's problem p is problem
        r·n + p), for a backend that advances the runs together; one set is returned as is.

        The sets must have the same shape (n, n_train, T, V). ``recovery_allowed`` stays ``[T]``
        when the runs agree on it, else it is ``[R·n, T]`` (each problem its run's rule);
        ``n_train`` and ``seed`` are the first set's (a stack is never split into training and
        held-out problems: each run's own set says that)."""
        if len(sets) == 1:
            return sets[0]
        first = sets[0]
        for ps in sets[1:]:
            if (ps.n, ps.n_train, ps.T, ps.V) != (first.n, first.n_train, first.T, first.V):
                raise ValueError(f"problem sets of shape (n, n_train, T, V) = {(ps.n, ps.n_train, ps.T, ps.V)} and "
                                 f"{(first.n, first.n_train, first.T, first.V)} cannot be stacked")
        same_rule = all(torch.equal(ps.recovery_allowed, first.recovery_allowed) for ps in sets)
        allowed = first.recovery_allowed if same_rule else torch.cat(
            [ps.recovery_allowed.unsqueeze(0).expand(ps.n, -1) for ps in sets])
        cat = {k: torch.cat([getattr(ps, k) for ps in sets]) for k in
               ("correct", "p_correct", "p_recover", "ability", "crux_step", "crux_hardness", "lengths", "skill")}
        return cls(spec=first.spec, recovery_allowed=allowed, segment_ends=[e for ps in sets for e in ps.segment_ends],
                   n_train=first.n_train, seed=first.seed, **cat)

    def base_logits(self) -> torch.Tensor:
        """``FloatTensor [n, T, 2, V]`` logits of the pre-trained policy: in status s at step t
        the correct token has probability p_correct (on-track) or p_recover (derailed) and the
        V-1 others share the rest equally."""
        V = self.V
        p_c = torch.stack([self.p_correct, self.p_recover], dim=2)  # [n, T, 2]
        p_other = (1.0 - p_c) / (V - 1)  # [n, T, 2]
        onehot = torch.nn.functional.one_hot(self.correct, V).bool().unsqueeze(2)  # [n, T, 1, V]
        probs = torch.where(onehot, p_c.unsqueeze(-1), p_other.unsqueeze(-1))  # [n, T, 2, V]
        return probs.log().float()

    def crux_mask(self) -> torch.Tensor:
        """``BoolTensor [n, T]`` True at crux steps."""
        m = torch.zeros(self.n, self.T, dtype=torch.bool)
        if self.crux_step.numel():
            m.scatter_(1, self.crux_step, True)
        return m


SKILL_STREAM = 2
"""``np.random.default_rng([problem_set_seed, SKILL_STREAM])`` draws each skill's token; streams
``SKILL_STREAM + 1`` and ``+ 2`` the skills and correct tokens of the training and held-out problems."""


def _draw_skills(spec: TokenTreeSpec, rng: np.random.Generator, count: int,
                 skill_token: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(skill, correct)``, each ``[count, T]``: the skill of every step (uniform over
    ``n_skills``) and its correct token, its skill's token ``skill_token [n_skills]`` with chance
    ``skill_consistency``, else one of the V - 1 others uniformly."""
    T, V = spec.depth, spec.vocab_size
    skill = rng.integers(0, spec.n_skills, size=(count, T))  # [count, T]
    follows = rng.random((count, T)) < spec.skill_consistency  # [count, T]
    other = (skill_token[skill] + 1 + rng.integers(0, V - 1, size=(count, T))) % V  # [count, T] never the skill's
    return skill, np.where(follows, skill_token[skill], other)


def _draw_problems(spec: TokenTreeSpec, rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    """``count`` problems of ``spec`` drawn from ``rng``: ``correct [count, T]``, ``p_correct
    [count, T]``, ``ability [count]``, ``crux_step`` and ``hardness [count, n_crux]``,
    ``lengths [count]`` (the draws' order is fixed, lengths last)."""
    n, T, V, C, h = count, spec.depth, spec.vocab_size, spec.n_crux, spec.heterogeneity
    correct = rng.integers(0, V, size=(n, T))  # [n, T]
    ability = spec.ability_mean + spec.ability_std * rng.standard_normal(n)  # [n]
    lo, hi = spec.crux_depth_low, spec.crux_depth_high
    # shared crux layout: evenly spaced over [lo, hi] with the mean hardness; each problem
    # moves a fraction h of the way to its own independent draw
    shared_pos = lo + (hi - lo) * (np.arange(C) + 0.5) / max(C, 1)  # [C] relative depths
    own_pos = np.sort(rng.uniform(lo, hi, size=(n, C)), axis=1)  # [n, C]
    rel = shared_pos[None, :] + h * (own_pos - shared_pos[None, :])  # [n, C]
    own_hard = spec.crux_hardness_mean + spec.crux_hardness_std * rng.standard_normal((n, C))  # [n, C]
    hardness = np.maximum(spec.crux_hardness_mean + h * (own_hard - spec.crux_hardness_mean), 0.0)  # [n, C]
    if spec.min_depth is None:
        lengths = np.full(n, T, dtype=np.int64)
    else:
        lengths = rng.integers(spec.min_depth, T + 1, size=n).astype(np.int64)  # [n] uniform in [min_depth, T]
    # a crux sits at relative depth rel of its own problem's length
    crux_step = np.clip(np.floor(rel * lengths[:, None]), 0, lengths[:, None] - 1).astype(np.int64)  # [n, C]
    logit = np.repeat(ability[:, None], T, axis=1)  # [n, T]
    for c in range(C):
        np.subtract.at(logit, (np.arange(n), crux_step[:, c]), hardness[:, c])
    p_correct = np.clip(1.0 / (1.0 + np.exp(-logit)), MIN_PROB, 1.0 - MIN_PROB)
    return {"correct": correct, "ability": ability, "crux_step": crux_step.reshape(n, C),
            "hardness": hardness.reshape(n, C), "lengths": lengths, "p_correct": p_correct}


def explain(spec: TokenTreeSpec) -> str:
    """One line summarising a spec in plain words, for output read by someone who has not read the code."""
    length = f"{spec.depth}" if spec.min_depth is None else f"{spec.min_depth}-{spec.depth}"
    crux = (f"{spec.n_crux} hard step{'s' if spec.n_crux != 1 else ''} per problem at "
            f"{spec.crux_depth_low:.0%}-{spec.crux_depth_high:.0%} of its length" if spec.n_crux else "no hard steps")
    spread = {0.0: "every problem alike", 1.0: "problems fully different"}.get(
        spec.heterogeneity, f"problems {spec.heterogeneity:.0%} different")
    if spec.recovery == "fatal":
        recovery = "a wrong token is fatal"
    elif spec.recovery == "constant":
        recovery = f"a wrong token can be undone (chance {spec.recovery_prob:g} of noticing)"
    else:
        recovery = (f"a wrong token can be undone, less so the deeper it is (chance {spec.recovery_prob:g} "
                    f"at the start, decay {spec.recovery_decay:g})")
    skills = (f"; every step calls on one of {spec.n_skills} shared skills, whose token is the correct one "
              f"{spec.skill_consistency:.0%} of the time" if spec.n_skills else "")
    return (f"{spec.n_problems} training + {spec.n_heldout} held-out problems; {length} steps of {spec.vocab_size} "
            f"tokens (one correct); {crux}; {spread}; {recovery}{skills}")
