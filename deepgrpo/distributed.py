"""Data-parallel helpers (torch.distributed; gloo on CPU, NCCL on GPU).

Data parallelism in DEEP-GRPO has two shared pieces of state besides the weights:

* the **loss normalisers**: each stream is aggregated over the *global* batch, so the
  per-stream denominators are summed over ranks and the gradients are summed (not averaged):
  after one step every rank holds exactly the parameters a single process would get on the
  union of the ranks' batches (:func:`global_denominators`, :func:`all_reduce_gradients`);
* the **recoverability estimator**: every rank feeds it every rank's (features, label) pairs,
  in rank order, so all ranks pick pivots from the same model (:class:`GatheredEstimator`).

All functions are no-ops when torch.distributed is not initialised or the world has one rank.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(items: list, rank: int | None = None, world_size: int | None = None) -> list:
    """This rank's share of ``items`` (contiguous blocks, sizes differ by at most one)."""
    r, w = world()
    r = r if rank is None else rank
    w = w if world_size is None else world_size
    base, extra = divmod(len(items), w)
    start = r * base + min(r, extra)
    return items[start:start + base + (1 if r < extra else 0)]


def global_denominators(local: Mapping[int, float]) -> dict[int, float]:
    """Sum per-stream loss denominators (:func:`deepgrpo.losses.loss_denominators`) over ranks.

    Pass the *raw* local counts (``loss_denominators(batch, cfg, floor=False)``: 0 for a stream
    this rank has nothing of): their sum is what a single process would use on the global
    batch; the sum is floored at 1 (a floor per rank would add 1 for every rank with an empty
    stream).
    """
    r, w = world()
    keys = sorted(local)
    if w == 1:
        return {k: max(float(local[k]), 1.0) for k in keys}
    t = torch.tensor([float(local[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: max(float(v), 1.0) for k, v in zip(keys, t.tolist())}


def all_reduce_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``parameters`` over ranks (in place; one flattened all-reduce)."""
    r, w = world()
    if w == 1:
        return
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return
    flat = torch.cat([p.grad.detach().reshape(-1).to(torch.float64) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad).to(p.grad.dtype))
        offset += n


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (a one-element list without a process group)."""
    r, w = world()
    if w == 1:
        return [obj]
    out: list[Any] = [None] * w
    dist.all_gather_object(out, obj)
    return out


class GatheredEstimator:
    """Wraps a recoverability estimator so that ``update`` uses every rank's data.

    ``update(features, labels)`` all-gathers the (features, labels) of all ranks and feeds
    their concatenation, in rank order, to the wrapped estimator on every rank; with identical
    initial states all ranks then hold identical estimators. ``predict``, ``state_dict`` and
    ``load_state_dict`` pass through. Every rank must call ``update`` the same number of times
    (with empty arrays if it has no pivots).
    """

    def __init__(self, estimator: Any) -> None:
        self.inner = estimator

    def update(self, features: Mapping[str, np.ndarray], labels: np.ndarray,
               **counts: np.ndarray) -> None:
        """Gather ``features`` (name -> ``[N_r]``) and ``labels`` ``[N_r]`` of all ranks, then update;
        keyword arrays ``[N_r]`` (an estimator that learns from counts: ``successes``, ``trials``)
        are gathered the same way and passed on as keywords."""
        payload = ({k: np.asarray(v) for k, v in features.items()}, np.asarray(labels))
        if counts:
            payload += ({k: np.asarray(v) for k, v in counts.items()},)
        parts = all_gather_objects(payload)
        labels_all = np.concatenate([p[1] for p in parts])
        if labels_all.size == 0:
            return
        keys = [k for k in parts[0][0]]
        feats_all = {k: np.concatenate([p[0][k] for p in parts if p[1].size]) for k in keys}
        if counts:
            self.inner.update(feats_all, labels_all,
                              **{k: np.concatenate([p[2][k] for p in parts if p[1].size]) for k in counts})
        else:
            self.inner.update(feats_all, labels_all)

    def predict(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """``[N]`` predictions of the wrapped estimator."""
        return self.inner.predict(features)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped estimator's state."""
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the wrapped estimator."""
        self.inner.load_state_dict(state)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
