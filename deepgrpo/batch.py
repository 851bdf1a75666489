"""Data model at the seam between the core and a backend: plain tensors with explicit masks.

Shapes use ``B`` for samples (rows) and ``T`` for response positions. A *response* is the
part generated after the prompt; prompts are opaque to the core (a problem id in the
simulator, token ids in the LLM backend) and are referenced by ``prompt_index`` into
``Batch.prompts``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

MAIN = 0
"""Stream id of main-chain samples (sampled from the root)."""
AUX = 1
"""Stream id of aux samples (continuations from a pivot)."""


@dataclass
class SampleRequest:
    """Ask a backend for ``n`` continuations of ``prompt`` + ``prefix``.

    prompt: the backend's own prompt object (opaque to the core).
    prefix: response tokens to continue from exactly, ``LongTensor [P]``; ``None`` or an empty
        tensor means the root (sample the whole response).
    n: number of continuations.
    """

    prompt: Any
    prefix: torch.Tensor | None
    n: int


@dataclass
class Rollouts:
    """What a backend returns for a list of :class:`SampleRequest` (rows in request order,
    ``n`` consecutive rows per request).

    tokens: ``LongTensor [B, T]`` generated tokens (the *suffix* after the request's prefix),
        right-padded.
    logprobs: ``FloatTensor [B, T]`` log-probs of those tokens under the sampling policy.
    mask: ``BoolTensor [B, T]`` True on generated tokens.
    rewards: ``FloatTensor [B]`` verifiable reward of the full response (prefix + suffix);
        truncated responses get 0.
    segment_ends: list of B ``LongTensor [L_b]``: exclusive end positions of the segments
        (steps) of the *full* response (prefix + suffix coordinates); the last equals the full
        response length.
    truncated: ``BoolTensor [B]`` True where generation hit the length limit.
    extras: backend-specific per-row tensors (first dim B), e.g. the simulator's first-error
        step; the core carries them along untouched.
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    mask: torch.Tensor
    rewards: torch.Tensor
    segment_ends: list[torch.Tensor]
    truncated: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        B = self.tokens.shape[0]
        for name in ("logprobs", "mask"):
            t = getattr(self, name)
            if t.shape != self.tokens.shape:
                raise ValueError(f"Rollouts.{name} has shape {tuple(t.shape)}, expected {tuple(self.tokens.shape)}")
        if self.rewards.shape != (B,):
            raise ValueError(f"Rollouts.rewards has shape {tuple(self.rewards.shape)}, expected ({B},)")
        if len(self.segment_ends) != B:
            raise ValueError(f"Rollouts.segment_ends has {len(self.segment_ends)} entries, expected {B}")
        if self.truncated is None:
            self.truncated = torch.zeros(B, dtype=torch.bool)

    @property
    def lengths(self) -> torch.Tensor:
        """``LongTensor [B]`` number of generated tokens per row."""
        return self.mask.sum(-1)

    def __len__(self) -> int:
        return self.tokens.shape[0]


@dataclass
class Batch:
    """A loss-ready batch: main and aux samples of one exploration step.

    prompts: the prompts of this step (backend objects), indexed by ``prompt_index``.
    prompt_index: ``LongTensor [B]`` which prompt each row answers.
    tokens: ``LongTensor [B, T]`` full response tokens (for aux rows: prefix + suffix).
    old_logprobs: ``FloatTensor [B, T]`` sampling-policy log-probs of ``tokens`` (for aux rows
        the prefix part is copied from the parent trajectory).
    response_mask: ``BoolTensor [B, T]`` True on real (non-pad) response tokens.
    trainable_mask: ``BoolTensor [B, T]`` True where the loss applies: the response, minus the
        frozen prefix of aux rows (prompts are not part of ``tokens`` and never trainable).
    stream: ``LongTensor [B]`` :data:`MAIN` or :data:`AUX`.
    group: ``LongTensor [B]`` advantage group (one per prompt for main rows, one per pivot for
        aux rows; ids are unique across streams).
    pivot_depth: ``FloatTensor [B]`` relative depth r of the row's pivot (0 for main rows).
    prefix_len: ``LongTensor [B]`` number of frozen prefix tokens (0 for main rows).
    rewards: ``FloatTensor [B]``.
    advantages: ``FloatTensor [B]`` (one scalar per sequence, broadcast over its tokens).
    segment_ends: list of B ``LongTensor [L_b]`` (see :class:`Rollouts`).
    extras: backend-specific per-row tensors (first dim B).
    replica: ``LongTensor [B]`` the run each row belongs to when one batch carries R independent
        runs (:func:`deepgrpo.explore.explore_replicas`); None = one run (all 0).
    """

    prompts: Sequence[Any]
    prompt_index: torch.Tensor
    tokens: torch.Tensor
    old_logprobs: torch.Tensor
    response_mask: torch.Tensor
    trainable_mask: torch.Tensor
    stream: torch.Tensor
    group: torch.Tensor
    pivot_depth: torch.Tensor
    prefix_len: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    segment_ends: list[torch.Tensor]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    replica: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.replica is None:
            self.replica = torch.zeros(self.tokens.shape[0], dtype=torch.long)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, rows: torch.Tensor) -> Batch:
        """A new batch with only ``rows`` (``BoolTensor [B]`` or ``LongTensor [B']``)."""
        if rows.dtype == torch.bool:
            rows = rows.nonzero().flatten()
        idx = rows.tolist()
        return Batch(
            prompts=self.prompts,
            prompt_index=self.prompt_index[rows], tokens=self.tokens[rows],
            old_logprobs=self.old_logprobs[rows], response_mask=self.response_mask[rows],
            trainable_mask=self.trainable_mask[rows], stream=self.stream[rows],
            group=self.group[rows], pivot_depth=self.pivot_depth[rows],
            prefix_len=self.prefix_len[rows], rewards=self.rewards[rows],
            advantages=self.advantages[rows], segment_ends=[self.segment_ends[i] for i in idx],
            extras={k: v[rows] for k, v in self.extras.items()}, replica=self.replica[rows],
        )

    def chunks(self, size: int) -> list[Batch]:
        """Split into micro-batches of at most ``size`` rows *of each run*: micro-batch k holds the
        k-th ``size`` consecutive rows of every run (:attr:`replica`), so each run is split as it
        would be alone (one run: consecutive micro-batches of at most ``size`` rows)."""
        if size < 1:
            raise ValueError(f"micro-batch size must be >= 1, got {size}")
        if not len(self):
            return []
        rep = self.replica
        counts = torch.bincount(rep)
        if int(counts.max()) <= size:
            return [self]
        # rank of each row within its run (rows of a run keep their order)
        order = torch.argsort(rep, stable=True)
        start = torch.cumsum(counts, 0) - counts  # [R]
        rank = torch.empty_like(rep)
        rank[order] = torch.arange(len(self)) - start[rep[order]]
        chunk = rank // size  # [B]
        return [self.select((chunk == k).nonzero().flatten()) for k in range(int(chunk.max()) + 1)]


@runtime_checkable
class Backend(Protocol):
    """What the core needs from a backend (simulator, transformers, vLLM...).

    ``sample`` draws continuations and rewards them; ``logprobs`` scores a batch's tokens.
    A backend may also offer ``sample_branches(prompts, tokens, prefix_len, n)``: the rollouts of
    ``sample([SampleRequest(prompts[a], tokens[a, :prefix_len[a]], n[a]) for a in range(A)])``
    from tensors (``tokens [A, >= max prefix_len]``, ``prefix_len [A]``, ``n [A]``), which the core
    then uses for a step's main chains (every prefix empty: root requests) and branches instead of
    one request object per prompt or branch point.
    """

    def sample(self, requests: Sequence[SampleRequest]) -> Rollouts:
        """Sample ``r.n`` continuations of ``r.prompt`` + ``r.prefix`` for each request, reward
        them, and return them as :class:`Rollouts` (rows in request order)."""
        ...

    def logprobs(self, batch: Batch, model: str = "policy") -> torch.Tensor:
        """``FloatTensor [B, T]`` per-token log-probs of ``batch.tokens`` given the prompt and
        preceding tokens, under ``model`` = ``"policy"`` (with gradient) or ``"reference"``
        (no gradient). Values at positions outside ``batch.response_mask`` are ignored."""
        ...
