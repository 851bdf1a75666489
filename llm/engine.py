"""The rollout-engine interface: what the LLM backend needs from a sampler (HF, vLLM, ...).

An engine works in **token space only**. A request is ``prompt ids + prefix ids`` and the
engine continues *exactly* from those ids (it never decodes and re-tokenizes), so a branch
from a pivot of a main trajectory shares that trajectory's tokens bit for bit.

Implementations: :class:`llm.hf_engine.HFEngine` (batched sampling with a KV cache on a
transformers model, CPU or GPU). A vLLM engine implements the same :class:`RolloutEngine`
protocol (``generate`` with per-request seeds and prefix caching; ``sync_weights`` loads the
trainer's weights into the vLLM workers).

Conventions shared by every engine:

* ``temperature > 0``: sample from softmax(logits / temperature), restricted to the top-p
  nucleus when ``top_p < 1``; the returned log-probs are those of that *sampling* distribution
  (log softmax(logits / T), renormalised over the nucleus), so that the trainer can recompute
  them (see :meth:`llm.backend.LLMBackend.logprobs`).
* ``temperature == 0``: greedy decoding; log-probs are those of softmax(logits) (T = 1).

:func:`sampling_log_probs` is the one implementation of that distribution from logits (the HF
engine samples from it, :func:`llm.hf_engine.sample_next`; the LLM backend and the TRL trainer
recompute the candidate feature ``next_entropy`` with it), :func:`distribution_entropy` its
entropy.
* A stop token, when sampled, is *included* in ``token_ids`` (and has a log-prob) and ends the
  generation with ``finished = True``. A generation that reaches ``max_new_tokens`` without a
  stop token has ``truncated = True``. Exactly one of the two holds (``max_new_tokens = 0``
  gives an empty, truncated generation).
* Outputs are in request order, ``n[i]`` consecutive generations for request ``i``.
* ``seed`` makes a call reproducible: the same engine weights, inputs and seed give the same
  tokens (on the same machine).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


def sampling_log_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Log-probs of the distribution an engine samples from (the module docstring's convention).

    Args:
        logits: ``[..., V]`` next-token logits (any leading shape; computed in float32).
        temperature: 0 = greedy: log softmax(logits) (top_p is then ignored); else
            log softmax(logits / temperature).
        top_p: nucleus mass in (0, 1]; < 1 keeps the smallest set of top tokens whose mass
            reaches top_p (a token is dropped when the mass of the tokens ranked above it is
            already >= top_p) and renormalises over it; dropped tokens get -inf.

    Returns: ``[..., V]`` float32 log-probs.
    """
    logits = logits.float()
    if temperature == 0:
        return torch.log_softmax(logits, -1)
    logp = torch.log_softmax(logits if temperature == 1.0 else logits / temperature, -1)  # [..., V]
    if top_p < 1.0:
        sorted_lp, order = logp.sort(-1, descending=True)
        mass_before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()  # [..., V]
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), -1)
    return logp


def distribution_entropy(logp: torch.Tensor) -> torch.Tensor:
    """``[...]`` entropy (nats) of the distributions with log-probs ``logp`` ``[..., V]`` (-inf,
    outside a nucleus, contributes 0)."""
    return -torch.where(torch.isfinite(logp), logp.exp() * logp, torch.zeros_like(logp)).sum(-1)


@dataclass
class Generation:
    """One sampled continuation of ``prompt ids + prefix ids``.

    token_ids: ``[S]`` generated suffix tokens (prefix *not* included; a final stop token is).
    logprobs: ``[S]`` log-prob of each generated token under the sampling distribution.
    finished: True if the generation ended with a stop token.
    truncated: True if it hit ``max_new_tokens`` without a stop token.
    entropies: ``[S]`` entropy (nats) of the distribution each token was drawn from (the one
        its log-prob is of: softmax(logits / T) over the top-p nucleus; softmax(logits) when
        greedy), or None if the engine does not report them (vLLM returns only the top-k
        log-probs, not the whole distribution).
    """

    token_ids: list[int]
    logprobs: list[float]
    finished: bool
    truncated: bool
    entropies: list[float] | None = None

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"Generation has {len(self.token_ids)} tokens but {len(self.logprobs)} log-probs")
        if self.entropies is not None and len(self.entropies) != len(self.token_ids):
            raise ValueError(f"Generation has {len(self.token_ids)} tokens but {len(self.entropies)} entropies")


@runtime_checkable
class RolloutEngine(Protocol):
    """A batched sampler over token ids (see the module docstring for the conventions)."""

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int | Sequence[int], *,
                 max_new_tokens: int | Sequence[int], temperature: float = 1.0, top_p: float = 1.0,
                 prefixes: Sequence[Sequence[int]] | None = None,
                 stop_token_ids: Sequence[int] | None = None,
                 seed: int | None = None) -> list[Generation]:
        """Sample continuations.

        Args:
            prompt_ids: R requests, each a list of prompt token ids ``[L_i]`` (``L_i >= 1``).
            n: continuations per request (an int for all, or R ints; 0 is allowed).
            max_new_tokens: limit on generated (suffix) tokens, an int or R ints. Callers that
                want a fixed *response* length pass ``max_len - len(prefixes[i])``.
            temperature: sampling temperature (0 = greedy).
            top_p: nucleus mass in (0, 1].
            prefixes: R lists of response token ids ``[P_i]`` to continue from exactly
                (None or empty lists = from the prompt alone).
            stop_token_ids: tokens that end a generation (None = the engine's default, usually
                the tokenizer's EOS).
            seed: makes the call reproducible (None = the engine's running random state).

        Returns:
            ``sum(n)`` :class:`Generation` objects, request-major (request i owns ``n[i]``
            consecutive entries).
        """
        ...

    def sync_weights(self, model: Any) -> None:
        """Make the engine sample from ``model``'s current weights (a transformers
        ``PreTrainedModel``) after an optimizer step. A no-op for an engine that samples with
        the trainer's own module (HF)."""
        ...


def normalize_requests(prompt_ids: Sequence[Sequence[int]], n: int | Sequence[int],
                       max_new_tokens: int | Sequence[int],
                       prefixes: Sequence[Sequence[int]] | None) -> tuple[list[int], list[int], list[list[int]]]:
    """Validate and broadcast per-request arguments of :meth:`RolloutEngine.generate`.

    Returns ``(n [R], max_new_tokens [R], prefixes [R] as lists of ints)``; raises ValueError
    on mismatched lengths, negative counts or empty prompts.
    """
    R = len(prompt_ids)
    ns = [int(n)] * R if isinstance(n, int) else [int(x) for x in n]
    mx = [int(max_new_tokens)] * R if isinstance(max_new_tokens, int) else [int(x) for x in max_new_tokens]
    pf = [[] for _ in range(R)] if prefixes is None else [[int(t) for t in p] for p in prefixes]
    for name, vals in (("n", ns), ("max_new_tokens", mx), ("prefixes", pf)):
        if len(vals) != R:
            raise ValueError(f"{name} has {len(vals)} entries for {R} requests")
    if any(x < 0 for x in ns) or any(x < 0 for x in mx):
        raise ValueError("n and max_new_tokens must be >= 0")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    return ns, mx, pf


@contextmanager
def reporting_rows(engine: Any, update: Callable[[int], None] | None) -> Iterator[bool]:
    """Report the generations of ``engine`` as they end, for a progress bar.

    Inside the block, an engine with a ``row_progress`` attribute (:class:`llm.hf_engine.HFEngine`)
    calls ``update(k)`` whenever k more rows of a ``generate`` call have ended (a stop token or
    the length cap), while it decodes; what it samples is unchanged. Yields True if it does,
    False if the engine has no such attribute (or ``update`` is None): the caller then counts a
    call's rows when it returns. The previous hook is restored on exit.
    """
    if update is None or not hasattr(engine, "row_progress"):
        yield False
        return
    before = engine.row_progress
    engine.row_progress = update
    try:
        yield True
    finally:
        engine.row_progress = before
