"""Held-out evaluation: greedy mean@1, sampled mean@1 and unbiased pass@k.

Used by the trainer (periodic evaluation), by SFT, and by ``deepgrpo llm eval``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import comb
from typing import Any

import numpy as np

from deepgrpo.config import check_range
from llm.engine import RolloutEngine, reporting_rows
from llm.rewards import score
from llm.tasks import Prompt


@dataclass
class EvalConfig:
    """Held-out evaluation.

    n_problems: held-out problems (512 carries about ±2 points of sampling noise at 40 %).
        n_problems x samples responses are sampled at once: a count whose responses cannot fit
        in this machine's memory is refused before anything is drawn.
    samples: sampled responses per problem at ``temperature`` (for sampled mean@1 and pass@k).
    pass_k: the k of pass@k (<= samples; unbiased estimator of Chen et al. 2021); None = samples.
    temperature: sampling temperature of the sampled metrics (paper: 1.0).
    max_response_tokens: response length cap (truncated = wrong); the longest prompt plus this
        cap must fit in the model's context (``max_position_embeddings``). During training the
        evaluation uses the training cap, ``sampling.max_response_tokens``.
    seed: evaluation seed (independent of the training random state).
    """

    n_problems: int = 512
    samples: int = 4
    pass_k: int | None = None
    temperature: float = 1.0
    max_response_tokens: int = 64
    seed: int = 1234

    def __post_init__(self) -> None:
        o = type(self).__name__
        check_range(o, "n_problems", self.n_problems, 1, None, integer=True)
        check_range(o, "samples", self.samples, 0, None, integer=True)
        if self.pass_k is not None:
            check_range(o, "pass_k", self.pass_k, 1, max(self.samples, 1), integer=True)
        check_range(o, "temperature", self.temperature, 0.0, None, lo_open=True)
        check_range(o, "max_response_tokens", self.max_response_tokens, 1, None, integer=True)

    @property
    def k(self) -> int:
        """The k of the reported pass@k (``pass_k``, or ``samples`` when it is None)."""
        return self.pass_k if self.pass_k is not None else max(self.samples, 1)


def unbiased_pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples with ``c`` correct: 1 - C(n-c, k) / C(n, k)."""
    if n < k:
        raise ValueError(f"pass@k needs n >= k, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def _rewards(engine: RolloutEngine, tokenizer: Any, prompts: Sequence[Prompt], n: int, temperature: float,
             max_tokens: int, seed: int, count: Callable[[int], Any] | None = None) -> np.ndarray:
    """``[P, n]`` rewards of n responses per prompt; ``count(rows)`` after the call (for an
    engine that does not report its rows while it decodes)."""
    gens = engine.generate([list(p.ids) for p in prompts], n, max_new_tokens=max_tokens,
                           temperature=temperature, stop_token_ids=[int(tokenizer.eos_token_id)], seed=seed)
    if count is not None:
        count(len(gens))
    r = np.zeros(len(gens))
    for j, g in enumerate(gens):
        p = prompts[j // n].problem
        r[j] = score(p.task, tokenizer.decode(g.token_ids, skip_special_tokens=True), p.answer, g.truncated)
    return r.reshape(len(prompts), n)  # [P, n]


def evaluate(engine: RolloutEngine, tokenizer: Any, prompts: Sequence[Prompt],
             config: EvalConfig | None = None, progress: bool = False,
             desc: str = "held-out evaluation") -> dict[str, float]:
    """Greedy and sampled accuracy of the engine's current model on ``prompts``.

    ``progress`` shows a progress bar named ``desc`` on stderr, counting responses as they end
    (``n_problems`` x (1 + ``samples``) in all); the numbers are the same with or without it.

    Returns: ``greedy_mean@1`` (accuracy of greedy decoding), ``sampled_mean@1`` (mean
    accuracy of the ``samples`` responses at ``temperature``), ``pass@k`` and ``n_problems``.
    """
    from tqdm.auto import tqdm

    cfg = config or EvalConfig()
    prompts = list(prompts)[:cfg.n_problems]
    # a bar shown below another one (a training run's) is cleared when done; on its own it stays
    with tqdm(total=len(prompts) * (1 + cfg.samples), desc=desc, unit=" answers", leave=None,
              disable=not progress) as bar, \
            reporting_rows(engine, bar.update if progress else None) as live:
        count = None if live or not progress else bar.update
        greedy = _rewards(engine, tokenizer, prompts, 1, 0.0, cfg.max_response_tokens, cfg.seed, count)[:, 0]
        out = {"greedy_mean@1": float(greedy.mean()), "n_problems": float(len(prompts))}
        if cfg.samples > 0:
            sampled = _rewards(engine, tokenizer, prompts, cfg.samples, cfg.temperature, cfg.max_response_tokens,
                               cfg.seed + 1, count)  # [P, n]
            out["sampled_mean@1"] = float(sampled.mean())
            c = sampled.sum(1).astype(int)
            out[f"pass@{cfg.k}"] = float(np.mean([unbiased_pass_at_k(cfg.samples, int(ci), cfg.k) for ci in c]))
    return out
