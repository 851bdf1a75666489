"""HF rollout engine: batched sampling with a KV cache on a transformers causal LM.

Implements :class:`llm.engine.RolloutEngine` with its own decoding loop (not ``generate``) so
that the returned log-probs are exactly those of the distribution that was sampled
(log softmax(logits / T), renormalised over the top-p nucleus), and so that continuations start
from the exact prompt + prefix ids. Each generation also reports the entropy of every token's
sampling distribution (``Generation.entropies``, from the same logits: one reduction over the
vocabulary per decoding step; ``report_entropies=False`` turns it off). Rows are left-padded
with explicit position ids; rows that finish are dropped from the batch and the KV cache as
decoding goes on.

Prefix sharing: rows with the same ``prompt + prefix`` ids (the K branches of one pivot, the G
main chains of one prompt) are prefilled once and their KV cache is copied K times, so a branch
from a deep pivot costs about its share of a full generation (``benchmarks/bench_branch_cost.py``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from llm.engine import Generation, distribution_entropy, normalize_requests, sampling_log_probs


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None, with_entropy: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one token per row from the sampling distribution (:func:`llm.engine.sampling_log_probs`).

    Args:
        logits: ``[B, V]`` next-token logits.
        temperature: 0 = greedy (log-probs of softmax(logits)); else softmax(logits / T).
        top_p: nucleus mass in (0, 1]; < 1 keeps the smallest set of top tokens whose mass
            reaches top_p and renormalises over it.
        generator: torch random generator (None = global RNG).
        with_entropy: also return the entropy of that distribution (the one the log-probs are of).

    Returns: ``(tokens [B] long, logprobs [B] float32)`` of the sampling distribution, and
    ``entropy [B] float32`` (nats) with ``with_entropy``; the tokens and log-probs do not depend
    on it.
    """
    logp = sampling_log_probs(logits, temperature, top_p)  # [B, V]
    if temperature == 0:
        tok = logp.argmax(-1)
    else:
        tok = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)  # [B]
    lp = logp.gather(1, tok[:, None]).squeeze(1)
    if with_entropy:
        return tok, lp, distribution_entropy(logp)
    return tok, lp


@functools.cache
def _reserved_layer_class() -> type | None:
    """The :func:`reserved_cache` layer class (built on first use, so that importing this module
    does not import transformers), or None if transformers has no ``DynamicLayer`` (< 4.56)."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return None

    class ReservedKVLayer(DynamicLayer):
        """A full-attention KV-cache layer that writes new keys and values into a buffer with
        room for ``final_length`` tokens, instead of concatenating (a copy of the whole cache)
        at every decoding step. ``keys`` / ``values`` are views ``[B, H, T, D]`` of the
        buffers ``[B, H, capacity, D]``; the values, and so the logits, are bit for bit those
        of ``DynamicLayer``. Anything that replaces ``keys`` (row selection after pruning)
        makes the next update move them into a fresh buffer."""

        def __init__(self, final_length: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.final_length = int(final_length)
            self._key_buf: torch.Tensor | None = None
            self._value_buf: torch.Tensor | None = None

        def _owns_keys(self) -> bool:
            buf = self._key_buf
            return (buf is not None and self.keys is not None and self.keys.numel() > 0
                    and self.keys.data_ptr() == buf.data_ptr() and self.keys.shape[0] == buf.shape[0])

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = self.get_seq_length()
            need = n + key_states.shape[-2]
            if not self._owns_keys() or need > self._key_buf.shape[-2]:
                B, H, _, D = key_states.shape  # [B, H, t, D]
                capacity = max(need, self.final_length) if need <= self.final_length else 2 * need
                keys = key_states.new_empty(B, H, capacity, D)  # [B, H, capacity, D]
                values = value_states.new_empty(B, H, capacity, value_states.shape[-1])
                if n:
                    keys[:, :, :n] = self.keys
                    values[:, :, :n] = self.values
                self._key_buf, self._value_buf = keys, values
            self._key_buf[:, :, n:need] = key_states
            self._value_buf[:, :, n:need] = value_states
            self.keys, self.values = self._key_buf[:, :, :need], self._value_buf[:, :, :need]
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            super().batch_select_indices(indices)
            self._key_buf = self._value_buf = None  # the selected rows are a new tensor

    return ReservedKVLayer


def reserved_cache(model: Any, final_length: int) -> Any | None:
    """A transformers ``DynamicCache`` for ``model`` whose layers reserve room for
    ``final_length`` tokens (see ``ReservedKVLayer`` in :func:`_reserved_layer_class`): decoding
    step t then costs the same whatever the cache length, so a branch from a deep pivot pays
    no more per token than a root generation's late steps.

    Returns None when that cannot be done safely — an older transformers, or a model whose
    cache layers are not all plain full-attention layers (sliding windows, linear attention,
    shared KV) — and the model then builds its own cache as usual.
    """
    layer_class = _reserved_layer_class()
    if layer_class is None:
        return None
    from transformers.cache_utils import DynamicCache, DynamicLayer

    try:
        cache = DynamicCache(config=model.config)
    except (TypeError, ValueError, AttributeError, KeyError):
        return None
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    cache.layers = [layer_class(final_length) for _ in layers]
    return cache


DEFAULT_MAX_BATCH_SIZE = 512
"""Rows :class:`HFEngine` decodes together by default (their KV cache is allocated at once)."""


class HFEngine:
    """Sample from a transformers causal LM (the trainer's own module: ``sync_weights`` is a no-op).

    Args:
        model: a ``PreTrainedModel`` causal LM.
        stop_token_ids: default stop tokens (usually ``[tokenizer.eos_token_id]``).
        pad_token_id: id used for left padding (never attended to).
        max_batch_size: rows decoded together (memory bound); larger calls are split.
        prune_fraction: drop finished rows from the batch and cache once at least this fraction
            of the current rows has finished.
        report_entropies: report the entropy of each token's sampling distribution
            (``Generation.entropies``; one reduction over the vocabulary per decoding step).
            False reports none (``entropies = None``), as an engine that cannot (vLLM); the
            sampled tokens and log-probs are the same either way.

    ``row_progress``, when set (see :func:`llm.engine.reporting_rows`), is called with the number
    of rows that ended (stop token or length cap) after each decoding step that ended some.
    """

    def __init__(self, model: Any, stop_token_ids: Sequence[int], pad_token_id: int,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, prune_fraction: float = 0.25,
                 report_entropies: bool = True) -> None:
        self.model = model
        self.stop_token_ids = [int(t) for t in stop_token_ids]
        self.pad_token_id = int(pad_token_id)
        self.max_batch_size = int(max_batch_size)
        self.prune_fraction = float(prune_fraction)
        self.report_entropies = bool(report_entropies)
        self._logits_kw: str | None = None
        self._cache_kw: str | None = None
        self.row_progress: Callable[[int], None] | None = None

    def sync_weights(self, model: Any) -> None:
        """No-op when ``model`` is the engine's module; otherwise sample from ``model`` from now on."""
        if model is not self.model:
            self._logits_kw = self._cache_kw = None
        self.model = model

    def _cache_name(self) -> str:
        """The name of the KV-cache argument of the model's ``forward`` and of its output field:
        ``cache`` in recent transformers (where ``past_key_values`` is deprecated), else
        ``past_key_values``."""
        if self._cache_kw is None:
            params = inspect.signature(self.model.forward).parameters
            self._cache_kw = "cache" if "cache" in params else "past_key_values"
        return self._cache_kw

    def _last_logits_only(self) -> dict[str, int]:
        """Keyword that makes the model compute logits for the last position only (prefill of
        long contexts with a large vocabulary), if its ``forward`` takes one."""
        if self._logits_kw is None:
            params = inspect.signature(self.model.forward).parameters
            self._logits_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), "")
        return {self._logits_kw: 1} if self._logits_kw else {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int | Sequence[int], *,
                 max_new_tokens: int | Sequence[int], temperature: float = 1.0, top_p: float = 1.0,
                 prefixes: Sequence[Sequence[int]] | None = None,
                 stop_token_ids: Sequence[int] | None = None,
                 seed: int | None = None) -> list[Generation]:
        """See :meth:`llm.engine.RolloutEngine.generate`."""
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
        ns, mx, pf = normalize_requests(prompt_ids, n, max_new_tokens, prefixes)
        stops = self.stop_token_ids if stop_token_ids is None else [int(t) for t in stop_token_ids]
        rows = [([int(t) for t in prompt_ids[i]] + pf[i], mx[i]) for i in range(len(ns)) for _ in range(ns[i])]
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(int(seed))
        out: list[Generation] = []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for s in range(0, len(rows), self.max_batch_size):
                    out += self._generate_rows(rows[s:s + self.max_batch_size], temperature, top_p, stops, gen)
        finally:
            self.model.train(was_training)
        return out

    def _generate_rows(self, rows: list[tuple[list[int], int]], temperature: float, top_p: float,
                       stops: list[int], gen: torch.Generator | None) -> list[Generation]:
        """Decode ``rows`` (context ids, max new tokens) together; see :meth:`_prefill_shared`
        for how rows with the same context share one prefill."""
        dev = self.device
        B = len(rows)
        limits = torch.tensor([m for _, m in rows], dtype=torch.long)  # [B]
        steps = int(limits.max()) if B else 0
        tokens = torch.full((B, max(steps, 0)), self.pad_token_id, dtype=torch.long)  # [B, S]
        logprobs = torch.zeros(B, max(steps, 0))  # [B, S]
        entropies = torch.zeros(B, max(steps, 0))  # [B, S] of each token's sampling distribution
        length = torch.zeros(B, dtype=torch.long)  # [B]
        finished = torch.zeros(B, dtype=torch.bool)  # [B]
        report, ended = self.row_progress, 0  # rows reported as ended so far
        if steps > 0:
            cache, logits, attn, next_pos = self._prefill_shared([ids for ids, _ in rows], steps)
            alive = torch.arange(B)  # cache row -> original row
            stop_set = torch.tensor(stops, dtype=torch.long)
            running = torch.ones(B, dtype=torch.bool)  # [b] rows still decoding
            for t in range(steps):
                active = running & (t < limits[alive])  # [b]
                if self.report_entropies:
                    tok, lp, ent = sample_next(logits, temperature, top_p, gen, with_entropy=True)
                    ent = ent.cpu()
                else:
                    tok, lp = sample_next(logits, temperature, top_p, gen)
                tok, lp = tok.cpu(), lp.cpu()
                rows_now = alive[active]
                tokens[rows_now, t] = tok[active]
                logprobs[rows_now, t] = lp[active]
                if self.report_entropies:
                    entropies[rows_now, t] = ent[active]
                length[rows_now] += 1
                stopped = active & torch.isin(tok, stop_set)
                finished[alive[stopped]] = True
                running = active & ~stopped & (t + 1 < limits[alive])
                if report is not None and (done := B - int(running.sum())) > ended:
                    report(done - ended)
                    ended = done
                if not bool(running.any()):
                    break
                if float((~running).float().mean()) >= self.prune_fraction:
                    keep = running.nonzero().flatten()
                    cache.batch_select_indices(keep.to(dev))
                    alive, tok, running = alive[keep], tok[keep], running[keep]
                    attn, next_pos = attn[keep.to(dev)], next_pos[keep.to(dev)]
                attn = torch.cat([attn, torch.ones(len(alive), 1, dtype=attn.dtype, device=dev)], 1)
                out = self.model(input_ids=tok[:, None].to(dev), attention_mask=attn,
                                 position_ids=next_pos[:, None], use_cache=True, **{self._cache_name(): cache})
                cache = getattr(out, self._cache_name())
                logits = out.logits[:, -1, :]
                next_pos = next_pos + 1
        if report is not None and ended < B:  # rows that never decoded (no room for a token)
            report(B - ended)
        result = []
        for b in range(B):
            n_b = int(length[b])
            result.append(Generation(token_ids=tokens[b, :n_b].tolist(), logprobs=logprobs[b, :n_b].tolist(),
                                     finished=bool(finished[b]), truncated=not bool(finished[b]),
                                     entropies=entropies[b, :n_b].tolist() if self.report_entropies else None))
        return result

    def _prefill_shared(self, contexts: list[list[int]], steps: int
                        ) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefill each *distinct* context once, then expand the KV cache to one row per context.

        The K continuations of a request (and the G main chains of a prompt) have the same
        ``prompt + prefix`` ids: their prompt is run through the model once and its cache rows
        are copied K times (``Cache.batch_select_indices`` with repeated indices), so a branch
        from a deep pivot pays for one prefill of its prefix instead of K. The copies hold
        exactly the keys and values a per-row prefill would compute, so sampling is unchanged.

        The cache reserves room for ``steps`` more tokens (:func:`reserved_cache`) when the
        model allows it.

        Args:
            contexts: B lists of token ids (prompt + prefix), each non-empty.
            steps: the most tokens any row will generate.

        Returns:
            ``(cache, logits [B, V], attention mask [B, L], next position [B])``: the KV cache of
            the left-padded contexts (L = longest distinct context), the next-token logits, the
            mask to extend while decoding and the position id of each row's next token.
        """
        dev = self.device
        index: dict[tuple[int, ...], int] = {}
        owner = [index.setdefault(tuple(ids), len(index)) for ids in contexts]  # row -> distinct context
        distinct = list(index)  # U distinct contexts, in order of first appearance
        U, Lmax = len(distinct), max(len(c) for c in distinct)
        input_ids = torch.full((U, Lmax), self.pad_token_id, dtype=torch.long)  # [U, L] left-padded
        attn = torch.zeros(U, Lmax, dtype=torch.long)  # [U, L]
        for u, ids in enumerate(distinct):
            input_ids[u, Lmax - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attn[u, Lmax - len(ids):] = 1
        position = (attn.cumsum(-1) - 1).clamp(min=0)  # [U, L]
        attn, position, input_ids = attn.to(dev), position.to(dev), input_ids.to(dev)
        out = self.model(input_ids=input_ids, attention_mask=attn, position_ids=position, use_cache=True,
                         **{self._cache_name(): reserved_cache(self.model, Lmax + steps)}, **self._last_logits_only())
        cache = getattr(out, self._cache_name())
        rows = torch.tensor(owner, dtype=torch.long, device=dev)  # [B] row -> cache row of its context
        if U < len(contexts) or owner != list(range(U)):
            cache.batch_select_indices(rows)
        logits = out.logits[:, -1, :][rows]  # [B, V]
        return cache, logits, attn[rows], position[rows, -1] + 1
