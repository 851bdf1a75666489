"""How much memory a simulator run needs, estimated from its sizes before anything is allocated.

A size that cannot fit (``--G 1000000``, ``--depth 10**9``, ``--vocab-size``, ``--n-problems``
...) would otherwise stop the run minutes later with an out-of-memory kill, or make it swap
for hours. The rule, checked by :func:`check_fits` before the problem set is drawn:

* **policy tables**: every table over (problem, step, status, token) — the pre-trained logits,
  the reference log-probs, the trainable table with its gradient and two Adam moments, the
  log-softmax with its autograd copies, the sampler's CDF and the oracle's float64 copies —
  about :data:`TABLE_ENTRY_BYTES` per entry, ``(n_problems + n_heldout) · depth · 2 ·
  vocab_size`` entries, plus :data:`PROBLEM_BYTES` per problem (its segment ends and the
  problem-set draws); the ``features`` policy adds its feature bank, ``feature_dim`` float32
  per entry (one bank, shared by every run of that size in a process);
* **one step's rollouts**: every tensor of a step over (row, step) — tokens, log-probs under
  three policies, masks, statuses, advantages, the exact value of every prefix, the loss's
  autograd intermediates — about :data:`ROW_STEP_BYTES` per (row, step), for at most
  ``min(batch_problems, n_problems) · G · (1 + n_pivots · K)`` rows (every main chain failed
  and was branched; ``aux_budget`` caps the branches) of ``depth`` steps.

The sum is compared against :func:`memory_limit`, :data:`MEMORY_FRACTION` of the machine's
physical memory (``os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')``). A run over it is
a :class:`~deepgrpo.config.ConfigError` naming the size that makes it big (of the largest term's
factors, the one furthest above its default), so the command line names its option (``--G``).
The constants were measured (peak resident memory of one training step) and rounded up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from deepgrpo.config import AlgoConfig, ExploreConfig, invalid
from sims.spec import TokenTreeSpec

if TYPE_CHECKING:
    from sims.runner import RunnerConfig

TABLE_ENTRY_BYTES = 80
"""Bytes per (problem, step, status, token) entry of the policy's tables: measured 63 with the
tabular policy and 75 with the features policy (its feature bank apart), 4,000 problems x 32
steps x 64 tokens, two DEEP-GRPO steps (the sampler keeps a step-major copy of the log-probs)."""
PROBLEM_BYTES = 512
"""Bytes per problem besides its tables (its segment ends as a tensor, per-problem draws)."""
ROW_STEP_BYTES = 256
"""Bytes per (rollout row, step) of one training step (measured 87-275; most at small depth)."""
FEATURE_BYTES = 4
"""Bytes per feature of the ``features`` policy (float32)."""
MEMORY_FRACTION = 0.8
"""Share of the machine's physical memory a run may be estimated to need."""


def physical_memory() -> int:
    """Bytes of physical memory of this machine."""
    return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))


def memory_limit() -> int:
    """Bytes a simulator run may be estimated to need: :data:`MEMORY_FRACTION` of the RAM."""
    return int(MEMORY_FRACTION * physical_memory())


@dataclass
class Term:
    """One part of a run's estimated memory.

    what: what it holds, in words; detail: its sizes, in words; bytes: its estimated size;
    factors: ``(owner, field, value, default)`` of the sizes it grows with (the config class
    and field name, so that an error about it names the option).
    """

    what: str
    detail: str
    bytes: int
    factors: list[tuple[str, str, int, int]]


def footprint(spec: TokenTreeSpec, runner: RunnerConfig | None = None, algo: AlgoConfig | None = None) -> list[Term]:
    """The estimated memory of a run of ``spec`` (and of its training loop ``runner``, a
    :class:`~sims.runner.RunnerConfig`, with ``algo``'s exploration), by term (see the module
    docstring). Pure arithmetic on the sizes: nothing is allocated."""
    S, R, E = TokenTreeSpec, "RunnerConfig", "ExploreConfig"
    n = spec.n_problems + spec.n_heldout
    entries = n * spec.depth * 2 * spec.vocab_size
    size = [("TokenTreeSpec", "n_problems", spec.n_problems, S.n_problems),
            ("TokenTreeSpec", "n_heldout", spec.n_heldout, S.n_heldout),
            ("TokenTreeSpec", "depth", spec.depth, S.depth),
            ("TokenTreeSpec", "vocab_size", spec.vocab_size, S.vocab_size)]
    terms = [Term("the policy's tables", f"{n:,} problems x {spec.depth:,} steps x 2 statuses x "
                  f"{spec.vocab_size:,} tokens", entries * TABLE_ENTRY_BYTES + n * PROBLEM_BYTES, size)]
    if runner is not None and runner.policy == "features":
        dim = int(runner.feature_dim)
        terms.append(Term("the features policy's feature bank", f"{dim:,} per table entry",
                          entries * dim * FEATURE_BYTES, [*size, (R, "feature_dim", dim, type(runner).feature_dim)]))
    if runner is not None and algo is not None:
        ex, d = algo.explore, ExploreConfig
        batch = min(int(runner.batch_problems), spec.n_problems)
        branches = 0 if ex.strategy == "root" else ex.n_pivots * ex.K
        per_prompt = ex.G * (1 + branches)
        if ex.aux_budget is not None:
            per_prompt = min(per_prompt, ex.G + ex.aux_budget)
        rows = batch * per_prompt
        batch_factor = ((R, "batch_problems", batch, type(runner).batch_problems) if batch < spec.n_problems
                        else ("TokenTreeSpec", "n_problems", spec.n_problems, S.n_problems))
        factors = [batch_factor, (E, "G", ex.G, d.G), ("TokenTreeSpec", "depth", spec.depth, S.depth)]
        if branches:
            factors += [(E, "K", ex.K, d.K), (E, "n_pivots", ex.n_pivots, d.n_pivots)]
        terms.append(Term("one step's rollouts", f"up to {rows:,} rows of {spec.depth:,} steps: {batch:,} problems x "
                          f"G = {ex.G:,} chains" + (f", up to {branches:,} branches each" if branches else ""),
                          rows * spec.depth * ROW_STEP_BYTES, factors))
    return terms


def bytes_text(n: float) -> str:
    """``n`` bytes in words: ``512 B``, ``3.1 GB``, ``7.4 TB``."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def check_fits(spec: TokenTreeSpec, runner: RunnerConfig | None = None, algo: AlgoConfig | None = None,
               limit: int | None = None) -> None:
    """Raise a :class:`~deepgrpo.config.ConfigError` naming the responsible size if a run of these settings is
    estimated (:func:`footprint`) to need more than ``limit`` bytes (default
    :func:`memory_limit`); do nothing otherwise."""
    terms = footprint(spec, runner, algo)
    total = sum(t.bytes for t in terms)
    limit = memory_limit() if limit is None else int(limit)
    if total <= limit:
        return
    big = max(terms, key=lambda t: t.bytes)
    owner, name, value, _ = max(big.factors, key=lambda f: f[2] / max(f[3], 1))
    raise invalid(owner, name, value, f"a size that fits in memory: {big.what} would take about "
                  f"{bytes_text(big.bytes)} ({big.detail}), the run about {bytes_text(total)} in all, more than the "
                  f"{bytes_text(limit)} limit ({MEMORY_FRACTION:.0%} of this machine's {bytes_text(physical_memory())} "
                  f"of RAM); choose a smaller {name}")

