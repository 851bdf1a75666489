"""HF rollout engine: batched sampling with a KV cache on a transformers causal LM.

Implements :class:`llm.engine.RolloutEngine` with its own decoding loop (not ``generate``) so
that the returned log-probs are exactly those of the distribution that was sampled
(log softmax(logits / T), renormalised over the top-p nucleus), and so that continuations start
from the exact prompt + prefix ids. Rows are left-padded with explicit position ids; rows that
finish are dropped from the batch and the KV cache as decoding goes on.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from llm.engine import Generation, normalize_requests


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row.

    Args:
        logits: ``[B, V]`` next-token logits.
        temperature: 0 = greedy (log-probs of softmax(logits)); else softmax(logits / T).
        top_p: nucleus mass in (0, 1]; < 1 keeps the smallest set of top tokens whose mass
            reaches top_p and renormalises over it.
        generator: torch random generator (None = global RNG).

    Returns: ``(tokens [B] long, logprobs [B] float32)`` of the sampling distribution.
    """
    logits = logits.float()
    if temperature == 0:
        logp = torch.log_softmax(logits, -1)  # [B, V]
        tok = logp.argmax(-1)
        return tok, logp.gather(1, tok[:, None]).squeeze(1)
    logp = torch.log_softmax(logits / temperature, -1)  # [B, V]
    if top_p < 1.0:
        sorted_lp, order = logp.sort(-1, descending=True)
        mass_before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()  # [B, V]
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), -1)
    tok = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)  # [B]
    return tok, logp.gather(1, tok[:, None]).squeeze(1)


class HFEngine:
    """Sample from a transformers causal LM (the trainer's own module: ``sync_weights`` is a no-op).

    Args:
        model: a ``PreTrainedModel`` causal LM.
        stop_token_ids: default stop tokens (usually ``[tokenizer.eos_token_id]``).
        pad_token_id: id used for left padding (never attended to).
        max_batch_size: rows decoded together (memory bound); larger calls are split.
        prune_fraction: drop finished rows from the batch and cache once at least this fraction
            of the current rows has finished.
    """

    def __init__(self, model: Any, stop_token_ids: Sequence[int], pad_token_id: int,
                 max_batch_size: int = 512, prune_fraction: float = 0.25) -> None:
        self.model = model
        self.stop_token_ids = [int(t) for t in stop_token_ids]
        self.pad_token_id = int(pad_token_id)
        self.max_batch_size = int(max_batch_size)
        self.prune_fraction = float(prune_fraction)

    def sync_weights(self, model: Any) -> None:
        """No-op when ``model`` is the engine's module; otherwise sample from ``model`` from now on."""
        self.model = model

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
        dev = self.device
        B = len(rows)
        limits = torch.tensor([m for _, m in rows], dtype=torch.long)  # [B]
        steps = int(limits.max()) if B else 0
        tokens = torch.full((B, max(steps, 0)), self.pad_token_id, dtype=torch.long)  # [B, S]
        logprobs = torch.zeros(B, max(steps, 0))  # [B, S]
        length = torch.zeros(B, dtype=torch.long)  # [B]
        finished = torch.zeros(B, dtype=torch.bool)  # [B]
        if steps > 0:
            Lmax = max(len(ids) for ids, _ in rows)
            input_ids = torch.full((B, Lmax), self.pad_token_id, dtype=torch.long)  # [B, L]
            attn = torch.zeros(B, Lmax, dtype=torch.long)  # [B, L]
            for b, (ids, _) in enumerate(rows):
                input_ids[b, Lmax - len(ids):] = torch.tensor(ids, dtype=torch.long)
                attn[b, Lmax - len(ids):] = 1
            position = (attn.cumsum(-1) - 1).clamp(min=0)  # [B, L]
            alive = torch.arange(B)  # cache row -> original row
            attn, position, input_ids = attn.to(dev), position.to(dev), input_ids.to(dev)
            out = self.model(input_ids=input_ids, attention_mask=attn, position_ids=position, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1, :]  # [b, V]
            next_pos = position[:, -1] + 1  # [b]
            stop_set = torch.tensor(stops, dtype=torch.long)
            running = torch.ones(B, dtype=torch.bool)  # [b] rows still decoding
            for t in range(steps):
                active = running & (t < limits[alive])  # [b]
                tok, lp = sample_next(logits, temperature, top_p, gen)
                tok, lp = tok.cpu(), lp.cpu()
                rows_now = alive[active]
                tokens[rows_now, t] = tok[active]
                logprobs[rows_now, t] = lp[active]
                length[rows_now] += 1
                stopped = active & torch.isin(tok, stop_set)
                finished[alive[stopped]] = True
                running = active & ~stopped & (t + 1 < limits[alive])
                if not bool(running.any()):
                    break
                if float((~running).float().mean()) >= self.prune_fraction:
                    keep = running.nonzero().flatten()
                    cache.batch_select_indices(keep.to(dev))
                    alive, tok, running = alive[keep], tok[keep], running[keep]
                    attn, next_pos = attn[keep.to(dev)], next_pos[keep.to(dev)]
                attn = torch.cat([attn, torch.ones(len(alive), 1, dtype=attn.dtype, device=dev)], 1)
                out = self.model(input_ids=tok[:, None].to(dev), attention_mask=attn,
                                 position_ids=next_pos[:, None], past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                logits = out.logits[:, -1, :]
                next_pos = next_pos + 1
        result = []
        for b in range(B):
            n_b = int(length[b])
            result.append(Generation(token_ids=tokens[b, :n_b].tolist(), logprobs=logprobs[b, :n_b].tolist(),
                                     finished=bool(finished[b]), truncated=not bool(finished[b])))
        return result
