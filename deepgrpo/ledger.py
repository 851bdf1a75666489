"""Budget ledger: rollouts and generated tokens per stream and per step, and equal-budget helpers.

Budget per prompt (paper §3.5): rollouts = G + |failed| · n_pivots · K. Branches generate only
their suffix, so the aux stream's token count is the sum of suffix lengths.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass
class StepBudget:
    """What one exploration step generated."""

    step: int
    prompts: int
    rollouts_main: int
    rollouts_aux: int
    tokens_main: int
    tokens_aux: int

    @property
    def rollouts(self) -> int:
        """Main + aux rollouts."""
        return self.rollouts_main + self.rollouts_aux

    @property
    def tokens(self) -> int:
        """Main + aux generated tokens."""
        return self.tokens_main + self.tokens_aux


@dataclass
class BudgetLedger:
    """Accumulates :class:`StepBudget` records; ``totals()`` gives cumulative counts."""

    steps: list[StepBudget] = field(default_factory=list)
    _summed: tuple[list[StepBudget] | None, int, tuple[int, ...]] = field(
        default=(None, 0, (0, 0, 0, 0, 0)), init=False, repr=False, compare=False)
    """(the list summed, how many of its steps, their sums): totals() adds only the new steps."""

    def record(self, prompts: int, rollouts_main: int, rollouts_aux: int,
               tokens_main: int, tokens_aux: int) -> StepBudget:
        """Append one step's counts and return its :class:`StepBudget`."""
        entry = StepBudget(len(self.steps), prompts, rollouts_main, rollouts_aux, tokens_main, tokens_aux)
        self.steps.append(entry)
        return entry

    def totals(self) -> dict[str, int]:
        """Cumulative ``rollouts_main``, ``rollouts_aux``, ``tokens_main``, ``tokens_aux``,
        ``rollouts``, ``tokens`` and ``prompts``."""
        keys = ("prompts", "rollouts_main", "rollouts_aux", "tokens_main", "tokens_aux")
        summed, n, sums = self._summed
        if summed is not self.steps or n > len(self.steps):  # replaced (load_state_dict) or shortened
            n, sums = 0, (0,) * len(keys)
        for s in self.steps[n:]:  # steps are only appended: a step's cost does not grow with the run
            sums = tuple(a + getattr(s, k) for a, k in zip(sums, keys))
        self._summed = (self.steps, len(self.steps), sums)
        out = dict(zip(keys, sums))
        out["rollouts"] = out["rollouts_main"] + out["rollouts_aux"]
        out["tokens"] = out["tokens_main"] + out["tokens_aux"]
        return out

    def rollouts_per_prompt(self) -> float:
        """Mean rollouts per prompt-step so far (0 before any step)."""
        t = self.totals()
        return t["rollouts"] / t["prompts"] if t["prompts"] else 0.0

    def state_dict(self) -> dict:
        """Plain-dict state (for checkpoints)."""
        return {"steps": [asdict(s) for s in self.steps]}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`."""
        self.steps = [StepBudget(**s) for s in state["steps"]]


BUDGET_UNITS = ("rollouts", "tokens")
"""Units a run's total budget can be stated in: rollouts (main + aux) or generated tokens."""


def budget_spent(ledger: BudgetLedger, unit: str) -> int:
    """The run's cumulative spending in ``unit`` (``rollouts`` or ``tokens``, main + aux)."""
    if unit not in BUDGET_UNITS:
        raise ValueError(f"budget unit {unit!r} is invalid: expected one of {', '.join(BUDGET_UNITS)}")
    return ledger.totals()[unit]


def budget_left(ledger: BudgetLedger, budget: int | None, unit: str) -> bool:
    """Whether a run with total ``budget`` (None = no budget) may take another step: it stops
    at the first step boundary where it has spent at least ``budget``, so it overshoots by
    less than one step's spending."""
    return budget is None or budget_spent(ledger, unit) < budget


def expected_rollouts_per_prompt(G: int, K: int, n_pivots: int, failure_rate: float) -> float:
    """E[rollouts per prompt] of DEEP-GRPO = G + G · failure_rate · n_pivots · K."""
    if not 0.0 <= failure_rate <= 1.0:
        raise ValueError(f"failure_rate = {failure_rate} is invalid: expected a number in [0, 1]")
    return G + G * failure_rate * n_pivots * K


def grpo_group_size_for_budget(rollouts_per_prompt: float, multiple_of: int = 1) -> int:
    """GRPO's N that spends ``rollouts_per_prompt`` (rounded to the nearest ``multiple_of``, >= 2)."""
    if rollouts_per_prompt <= 0 or not math.isfinite(rollouts_per_prompt):
        raise ValueError(f"rollouts_per_prompt = {rollouts_per_prompt} is invalid: expected a number > 0")
    n = int(round(rollouts_per_prompt / multiple_of)) * multiple_of
    return max(n, 2)


def aux_cap_for_budget(rollouts_per_prompt: float, G: int) -> int:
    """The per-prompt aux cap (``ExploreConfig.aux_budget``) that keeps a branching method at
    ``rollouts_per_prompt``: the budget minus the G main chains (>= 0)."""
    if rollouts_per_prompt < 0:
        raise ValueError(f"rollouts_per_prompt = {rollouts_per_prompt} is invalid: expected a number >= 0")
    return max(int(math.floor(rollouts_per_prompt)) - G, 0)
