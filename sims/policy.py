"""The simulated policy: a torch module of logits per (problem, step, status, token).

``logits = base + delta``: ``base`` is the pre-trained policy of the problem set (a fixed
buffer, also the KL reference) and ``delta`` the trainable part, zero at initialisation, so the
initial policy *is* the pre-trained one. Two classes (:data:`POLICY_CLASSES`):

* ``tabular``: ``delta`` is a free table ``[n, T, 2, V]``. Nothing transfers between problems:
  a problem that is never trained on (a held-out one) keeps its pre-trained logits exactly.
* ``features``: ``delta[p, t, s, v] = φ(p, t, s, v) · w`` with ``w ∈ R^D`` shared trainable
  weights and ``φ`` fixed random features ``~ N(0, 1/D)`` of dimension ``D = feature_dim``,
  one per table entry, i.i.d. ``φ`` is a function of the indices (problem, step, status,
  token) only: the policy is never told which token is correct (swapping the correct tokens of
  a problem set leaves every ``delta`` unchanged), so what it learns on one problem moves every
  other problem's logits through the overlap of their features — transfer and interference,
  the way shared weights of an LLM couple prompts. ``D`` is its capacity: with
  ``D >= n·T·2·V`` the features span every table; with fewer, updates must share directions.
  (1/D variance: ||φ||² ≈ 1, so one SGD step moves an entry's own logit as a table would, and
  its overlap with any other entry is of order 1/√D.)

  How φ is drawn: one *feature bank* ``[D, M]`` (``M = n·T·2·V`` i.i.d. ``N(0, 1/D)`` columns, a
  fixed draw per (M, D)) serves every problem set of that size, and each problem set's seed draws
  its *feature map*, a uniformly random permutation of the columns and a fair random sign per
  entry (:func:`random_features`). A permuted, sign-flipped set of i.i.d. symmetric columns is
  again i.i.d. ``N(0, 1/D)``, so each run's φ is distributed exactly as a fresh draw of its own;
  what runs of different problem sets share is the bank's set of columns (their feature Gram
  matrices are relabelings of one another, not independent). This is what lets R runs be
  computed as one matrix product over the bank (``[R, D] @ [D, M]``, in tiles of
  :data:`FEATURE_TILE` runs) instead of R products over R private tables of ``D·M`` floats
  each, which is memory-bound (about 4.7 MB per run and step at the defaults).

* ``skills``: ``delta[p, t, s, v] = own[p, t, s, v] + skill[k(p, t), s, v]``, a free table per
  (problem, step) as in ``tabular`` (so training problems never run out of capacity) plus a
  table ``[n_skills, 2, V]`` shared by every step that calls on the same skill k(p, t)
  (``TokenTreeSpec.n_skills``: the problem set says which skill each step needs, never which
  token is correct). What the shared table learns on training problems moves the logits of
  every held-out step with that skill: it transfers where the skill's token is the step's correct
  one and interferes where it is not, in the proportion ``TokenTreeSpec.skill_consistency`` sets
  (1: transfer only; 1/V: interference only). A held-out problem's own table is never trained,
  so whatever changes its logits came through the skills.

Everything a training step reads from the policy without gradient (sampling tables, the
oracle's input, the entropy) is derived from one :class:`PolicySnapshot` per set of weights
(:meth:`TokenTreePolicy.snapshot`), computed at most once however many times it is read.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property

import numpy as np
import torch

from sims.sampler import SamplingTable
from sims.spec import ProblemSet

POLICY_CLASSES = ("tabular", "features", "skills")
"""Policy classes of :class:`TokenTreePolicy` (``RunnerConfig.policy``)."""

FEATURE_STREAM = 2
"""``np.random.SeedSequence([problem_set_seed, FEATURE_STREAM])`` draws a problem set's feature map
(which bank column, with which sign, is the feature of each table entry)."""
FEATURE_BANK_STREAM = 3
"""``np.random.SeedSequence([FEATURE_BANK_STREAM, entries, dim])`` draws the feature bank."""
FEATURE_TILE = 8
"""Runs per matrix product of the features policy: every product has this many weight rows (the
last group padded with zero rows), so a run's logits and gradient come out of the same kernel, with
the same bits, whatever its position and however many runs share the batch."""


def _generator(*entropy: int) -> torch.Generator:
    seed = np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(seed >> np.uint64(1)))


FEATURE_BANK_CACHE_BYTES = 256 << 20
"""Feature banks kept per process (one per table size and dimension: a study's runs share one)."""
_BANKS: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()


def feature_bank(entries: int, dim: int) -> torch.Tensor:
    """``FloatTensor [dim, entries]`` the feature bank of every problem set with ``entries`` table
    entries (n·T·2·V): i.i.d. ``N(0, 1/dim)``, a fixed draw (the same in every process), kept per
    process. Read-only: it is shared by every policy of that size."""
    key = (int(entries), int(dim))
    bank = _BANKS.get(key)
    if bank is None:
        draw = torch.randn(entries, dim, generator=_generator(FEATURE_BANK_STREAM, entries, dim))  # [M, D]
        bank = draw.t().contiguous().div_(dim ** 0.5)  # [D, M]
        _BANKS[key] = bank
        while sum(b.numel() * b.element_size() for b in _BANKS.values()) > FEATURE_BANK_CACHE_BYTES \
                and len(_BANKS) > 1:
            _BANKS.popitem(last=False)
    else:
        _BANKS.move_to_end(key)
    return bank


def feature_map(problems: ProblemSet) -> tuple[torch.Tensor, torch.Tensor]:
    """``(LongTensor [M], FloatTensor [M])`` with ``M = n·T·2·V``: the bank column and the sign
    (±1) of each table entry's feature (row-major (problem, step, status, token)), a uniformly
    random permutation and independent fair signs drawn from the problem-set seed only (never from
    the correct tokens)."""
    M = problems.n * problems.T * 2 * problems.V
    gen = _generator(problems.seed, FEATURE_STREAM)
    column = torch.randperm(M, generator=gen)
    sign = torch.randint(0, 2, (M,), generator=gen).float().mul_(2).sub_(1)
    return column, sign


def random_features(problems: ProblemSet, dim: int) -> torch.Tensor:
    """``FloatTensor [n·T·2·V, dim]`` the fixed features φ of every (problem, step, status, token)
    of ``problems``, row-major in that order: bank column ``column[m]`` times ``sign[m]``
    (:func:`feature_bank`, :func:`feature_map`), so i.i.d. ``N(0, 1/dim)`` like a fresh draw."""
    n, T, V = problems.n, problems.T, problems.V
    column, sign = feature_map(problems)
    return (feature_bank(n * T * 2 * V, dim)[:, column] * sign).t()


class TokenTreePolicy(torch.nn.Module):
    """Logits ``[n, T, 2, V]`` of a simulated policy (see the module docstring), or of R
    independent ones side by side.

    Args:
        problems: the problem set (base logits; the correct tokens only for :meth:`correct_probs`,
            the oracle's input, never for the trainable part), or the problem sets of R runs
            (same shape): then every table is that of :meth:`ProblemSet.stack` (run r's problem p
            is row r·n + p) and every parameter has the run as its first dimension (``delta``
            ``[R, n, T, 2, V]``, ``weight`` ``[R, D]``), each run its own weights and feature map
            (``feature_column``, ``feature_sign`` ``[R, n·T·2·V]``, over the shared
            ``feature_bank`` ``[D, n·T·2·V]``).
        kind: ``tabular``, ``features`` or ``skills`` (the problem sets must have skills:
            ``TokenTreeSpec.n_skills >= 1``, the same number in every set).
        feature_dim: D, the features policy's number of shared weights.
    """

    def __init__(self, problems: ProblemSet | Sequence[ProblemSet], kind: str = "tabular",
                 feature_dim: int = 256) -> None:
        super().__init__()
        if kind not in POLICY_CLASSES:
            raise ValueError(f"kind = {kind!r} is invalid: expected one of {', '.join(POLICY_CLASSES)}")
        sets = [problems] if isinstance(problems, ProblemSet) else list(problems)
        problems = ProblemSet.stack(sets)
        self.kind = kind
        self.replicas = R = len(sets)
        n, T, V = problems.n, problems.T, problems.V
        self.shape = (n, T, 2, V)  # every run's problems, run after run
        self.register_buffer("base", problems.base_logits())  # [n, T, 2, V]
        self.register_buffer("base_log_probs", torch.log_softmax(self.base, dim=-1))  # [n, T, 2, V]
        onehot = torch.nn.functional.one_hot(problems.correct, V).bool().unsqueeze(2)  # [n, T, 1, V]
        self.register_buffer("is_correct", onehot)  # the correct tokens, for the oracle only
        index = problems.correct[:, :, None, None].expand(n, T, 2, 1).contiguous()  # [n, T, 2, 1]
        self.register_buffer("correct_index", index, persistent=False)  # read by correct_probs only
        if kind in ("tabular", "skills"):
            self.delta = torch.nn.Parameter(torch.zeros(R, n // R, T, 2, V))
        if kind == "skills":
            K = {ps.spec.n_skills for ps in sets}
            if len(K) != 1 or min(K) < 1 or bool((problems.skill < 0).any()):
                raise ValueError("the skills policy needs problem sets with skills (TokenTreeSpec.n_skills >= 1, "
                                 f"the same in every set); got n_skills = {sorted(K)}")
            K = K.pop()
            run = torch.arange(R).repeat_interleave(n // R)[:, None]  # [n, 1] each problem's run
            # [n, T] row of each step's skill in the runs' stacked skill tables (run r's skill k: r·K + k)
            self.register_buffer("skill_row", run * K + problems.skill, persistent=False)
            self.skill_weight = torch.nn.Parameter(torch.zeros(R, K, 2, V))  # [R, K, 2, V]
        elif kind == "features":
            D, M = int(feature_dim), n // R * T * 2 * V
            maps = [feature_map(ps) for ps in sets]
            # [D, M] the bank, shared (not copied) by every policy of this size: never written
            self.register_buffer("feature_bank", feature_bank(M, D), persistent=False)
            self.register_buffer("feature_column", torch.stack([c for c, _ in maps]))  # [R, M] each run's map
            self.register_buffer("feature_sign", torch.stack([s for _, s in maps]))  # [R, M]
            self.weight = torch.nn.Parameter(torch.zeros(R, D))  # [R, D]

    def logit_delta(self) -> torch.Tensor:
        """``[n, T, 2, V]`` the trainable part of the logits (with gradient)."""
        if self.kind == "tabular":
            return self.delta.view(self.shape)
        if self.kind == "skills":  # own table + the shared table of each step's skill
            return self.delta.view(self.shape) + self.skill_weight.view(-1, *self.shape[2:])[self.skill_row]
        # every run's weights times the shared bank, FEATURE_TILE runs per product:
        # [R8 / 8, 8, D] @ [D, M] (the bank broadcast, not copied) -> [R8, M], then each run's
        # entries picked from its own columns with its own signs -> [R, M]
        R, D = self.weight.shape
        pad = -R % FEATURE_TILE
        w = torch.cat([self.weight, self.weight.new_zeros(pad, D)]) if pad else self.weight  # [R8, D]
        bank = self.feature_bank
        tiles = torch.bmm(w.view(-1, FEATURE_TILE, D), bank.expand(w.shape[0] // FEATURE_TILE, *bank.shape))
        out = tiles.view(w.shape[0], -1)[:R]  # [R, M] w_r · bank column j
        return (out.gather(1, self.feature_column) * self.feature_sign).view(self.shape)

    def logits(self) -> torch.Tensor:
        """``[n, T, 2, V]`` current logits (with gradient)."""
        return self.base + self.logit_delta()

    def log_probs(self) -> torch.Tensor:
        """``[n, T, 2, V]`` log π(v | p, t, s) (with gradient).

        The current snapshot's forward pass is handed out once where it still holds these weights
        (:class:`PolicySnapshot`: taken with gradient, it is the next update's first forward pass,
        the same numbers without computing them twice)."""
        snap = self.__dict__.get("_snapshot")
        if snap is not None and snap.graph is not None and torch.is_grad_enabled() and reuse_enabled() \
                and snap.matches(self):
            out, snap.graph = snap.graph, None
            return out
        return torch.log_softmax(self.logits(), dim=-1)

    def reference_log_probs(self) -> torch.Tensor:
        """``[n, T, 2, V]`` log-probs of the pre-trained (reference) policy (no gradient)."""
        return self.base_log_probs

    def snapshot(self) -> PolicySnapshot:
        """The :class:`PolicySnapshot` of the current weights: the last one taken while the
        weights are unchanged (computed tables are reused), else a new one."""
        snap = self.__dict__.get("_snapshot")
        if snap is None or not reuse_enabled() or not snap.matches(self):
            snap = PolicySnapshot(self)
            self.__dict__["_snapshot"] = snap
        return snap

    @torch.no_grad()
    def correct_probs(self, log_probs: torch.Tensor | None = None) -> torch.Tensor:
        """``DoubleTensor [n, T, 2]`` π(correct token | p, t, s), the oracle's input (from
        ``log_probs`` ``[n, T, 2, V]`` if already computed)."""
        lp = self.log_probs() if log_probs is None else log_probs
        # the correct token's own entry: exactly the log-sum-exp over {correct token} (max-shifted,
        # it is max + log(1)), without a masked float64 copy of the [n, T, 2, V] table
        return lp.gather(-1, self.correct_index).squeeze(-1).double().exp()

    @torch.no_grad()
    def entropy(self, log_probs: torch.Tensor | None = None) -> torch.Tensor:
        """``FloatTensor [n, T, 2]`` entropy (nats) of π(· | p, t, s) (from ``log_probs`` if given)."""
        lp = self.log_probs() if log_probs is None else log_probs
        return -(lp.exp() * lp).sum(-1)


_REUSE_SNAPSHOTS = [True]


@contextmanager
def fresh_snapshots() -> Iterator[None]:
    """Inside the block, :meth:`TokenTreePolicy.snapshot` (and the backend's replayed statuses)
    are recomputed on every call instead of reused: the slow reference path that
    ``tests/test_sims_equivalence.py`` holds the reusing one to, bit for bit."""
    _REUSE_SNAPSHOTS.append(False)
    try:
        yield
    finally:
        _REUSE_SNAPSHOTS.pop()


def reuse_enabled() -> bool:
    """Whether per-weights results may be reused (False inside :func:`fresh_snapshots`)."""
    return _REUSE_SNAPSHOTS[-1]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same bits (same dtype and shape; -0.0 differs from 0.0,
    equal NaNs match): equal inputs of a computation, not merely equal numbers."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point() and a.element_size() in _BITS:
        bits = _BITS[a.element_size()]
        return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))
    return torch.equal(a, b)


_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


class PolicySnapshot:
    """Everything derived without gradient from a :class:`TokenTreePolicy` at one set of weights,
    each computed on first use and then kept:

    - ``log_probs``: ``FloatTensor [n, T, 2, V]`` log π(v | p, t, s) (and ``graph``: the same values
      with gradient, handed once to :meth:`TokenTreePolicy.log_probs` while the weights are unchanged);
    - ``sampling``: its :class:`~sims.sampler.SamplingTable` (the sampler's CDF);
    - ``correct_probs``: ``DoubleTensor [n, T, 2]`` π(correct token | p, t, s) (the oracle's input);
    - ``entropy``: ``FloatTensor [n, T, 2]`` entropy (nats) of π(· | p, t, s);
    - :meth:`success_table`: the exact ``DoubleTensor [n, T + 1, 2]`` P(success | t, status).

    The values are those of :meth:`TokenTreePolicy.log_probs`, :meth:`~TokenTreePolicy.correct_probs`,
    :meth:`~TokenTreePolicy.entropy` and :func:`sims.oracle.success_table` computed afresh (the same
    operations on the same weights). Treat them as read-only: they are shared by every reader.

    :meth:`matches` tells whether the policy still has these weights: the same parameter objects
    holding the same bits (compared to a copy taken at construction, so any change is seen,
    in-place writes through ``.data`` included) and the same, unmodified buffers (the problem set's
    constants: identity, version counter and storage).
    """

    def __init__(self, policy: TokenTreePolicy) -> None:
        self._policy = policy
        self._params = [(p, p.detach().clone()) for p in policy.parameters()]
        self._buffers = [(b, b._version, b.data_ptr()) for b in policy.buffers()]
        self._tables: dict[int, tuple[ProblemSet, torch.Tensor]] = {}
        self.graph: torch.Tensor | None = None
        # taken now, with the weights just copied: every other value derives from it; with gradient
        # where the policy trains, so that the next update's forward pass is this one (graph)
        if torch.is_grad_enabled() and reuse_enabled() and any(p.requires_grad for p in policy.parameters()):
            self.graph = torch.log_softmax(policy.logits(), dim=-1)  # [n, T, 2, V]
            self.log_probs = self.graph.detach()
        else:
            with torch.no_grad():
                self.log_probs = policy.log_probs()  # [n, T, 2, V]

    def matches(self, policy: TokenTreePolicy) -> bool:
        """Whether ``policy`` is the snapshot's policy with the snapshot's weights."""
        if policy is not self._policy:
            return False
        params, buffers = list(policy.parameters()), list(policy.buffers())
        if len(params) != len(self._params) or len(buffers) != len(self._buffers):
            return False
        for p, (q, copy) in zip(params, self._params):
            if p is not q or not _same_bits(p.detach(), copy):
                return False
        return all(b is c and b._version == v and b.data_ptr() == ptr
                   for b, (c, v, ptr) in zip(buffers, self._buffers))

    @cached_property
    def sampling(self) -> SamplingTable:
        return SamplingTable.from_log_probs(self.log_probs)

    @cached_property
    def correct_probs(self) -> torch.Tensor:
        return self._policy.correct_probs(self.log_probs)

    @cached_property
    def entropy(self) -> torch.Tensor:
        return self._policy.entropy(self.log_probs)

    def success_table(self, problems: ProblemSet) -> torch.Tensor:
        """``DoubleTensor [n, T + 1, 2]`` :func:`sims.oracle.success_table` of ``problems`` (the
        policy's problem set, or one with the same shape) under these weights."""
        from sims.oracle import success_table
        hit = self._tables.get(id(problems))
        if hit is None or hit[0] is not problems:
            hit = (problems, success_table(problems, self.correct_probs))
            self._tables[id(problems)] = hit
        return hit[1]
