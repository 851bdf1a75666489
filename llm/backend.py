"""LLMBackend: the core's :class:`~deepgrpo.batch.Backend` protocol on a transformers causal LM.

* ``sample``: rollouts from a :class:`~llm.engine.RolloutEngine` (prompt ids + exact prefix ids),
  rewarded by the task's verifier on the decoded *full* response (prefix + suffix), with
  segment ends in full-response token coordinates. Main chains (every request from the root)
  from an engine that reports entropies (HF) carry the candidate feature ``cand_next_entropy``
  ``DoubleTensor [B, T+1]``: the entropy of the sampling distribution of response token t
  (the state after t tokens a branch resamples from; temperature and top-p applied,
  :func:`llm.engine.sampling_log_probs`), 0 at and after the row's end. The vLLM engine reports
  no entropies (vLLM returns only top-k log-probs, not the whole distribution): with
  ``entropy_feature=True`` the backend then computes the feature by one no-grad forward pass of
  the policy over the main rows (in chunks of ``logprob_chunk_size`` rows), else its rollouts
  lack it.
* ``logprobs``: per-token log-probs of ``prompt + response`` under the policy (with gradient)
  or the frozen reference (no gradient), computed in row chunks, at the sampling temperature,
  so that they equal the engine's log-probs up to floating-point error.

Prompts handed to the core are :class:`~llm.tasks.Prompt` objects (problem + token ids).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deepgrpo.batch import Batch, Rollouts, SampleRequest
from deepgrpo.config import ConfigError, check_range, invalid
from llm.engine import RolloutEngine, distribution_entropy, sampling_log_probs
from llm.rewards import score
from llm.segmenters import Segmenter
from llm.tasks import Problem, Prompt


@dataclass
class SamplingConfig:
    """How rollouts are drawn (paper: temperature 1.0).

    max_response_tokens: cap on a response's length in tokens, prefix included (a branch from
        a pivot at depth P may generate max_response_tokens - P tokens); hitting it without EOS
        is a truncation (reward 0). At most the model's context (max_position_embeddings)
        less the longest prompt, and small enough that a step's responses fit in memory; both
        are checked before a run starts.
    temperature: sampling temperature (> 0 for RL; the trainer's log-probs use the same T).
    top_p: nucleus mass; the trainer's log-probs ignore the nucleus, so keep 1.0 for exact
        ratios (the rollout-vs-trainer mismatch metric shows the effect otherwise).
    """

    max_response_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        o = type(self).__name__
        check_range(o, "max_response_tokens", self.max_response_tokens, 1, None, integer=True)
        check_range(o, "temperature", self.temperature, 0.0, None, lo_open=True)
        check_range(o, "top_p", self.top_p, 0.0, 1.0, lo_open=True)


BYTES_PER_SAMPLED_TOKEN = 64
"""Host memory one sampled token takes, at least, until the step's update is done: its id and
log-prob as Python objects in the engine's output (a list slot of 8 bytes and an object of 24-28
bytes each) and its entries in the rollout tensors (id 8, log-prob 4, mask 1). A lower bound:
sizes refused with it are certainly too large."""


def machine_memory_bytes() -> int | None:
    """Physical memory of this machine (``os.sysconf``), or None where it cannot be read."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def sampling_memory_bytes(rows: int, longest_prompt: int, max_tokens: int, kv_bytes_per_token: int = 0,
                          engine_rows: int = 512) -> int:
    """A lower-bound estimate of the memory of sampling ``rows`` responses of up to
    ``max_tokens`` tokens in one call: :data:`BYTES_PER_SAMPLED_TOKEN` per sampled token, plus
    the KV cache of the ``min(rows, engine_rows)`` sequences decoded together (prompt + response
    long, ``kv_bytes_per_token`` each; 0 where the cache lives on a GPU)."""
    host = rows * max_tokens * BYTES_PER_SAMPLED_TOKEN
    kv = min(rows, engine_rows) * (longest_prompt + max_tokens) * kv_bytes_per_token
    return host + kv


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def check_sampling_fits(rows: int, longest_prompt: int, max_tokens: int, factors: Sequence[tuple[str, str, int, int]],
                        what: str, kv_bytes_per_token: int = 0, engine_rows: int = 512,
                        memory: int | None = None) -> None:
    """Raise :class:`~deepgrpo.config.ConfigError` if :func:`sampling_memory_bytes` exceeds the
    machine's memory (``memory``, default :func:`machine_memory_bytes`), before anything is
    allocated. ``factors`` are the settings that make ``rows`` and ``max_tokens``, as
    ``(config class, field, value, default)``; the error names the one furthest above its
    default (so that a command line names its flag) and lists the others.

    ``what`` says what is sampled (``"a training step"``)."""
    need = sampling_memory_bytes(rows, longest_prompt, max_tokens, kv_bytes_per_token, engine_rows)
    have = machine_memory_bytes() if memory is None else memory
    if have is None or need <= have:
        return
    owner, name, value, _ = max(factors, key=lambda f: f[2] / max(f[3], 1))
    others = ", ".join(f[1] for f in factors if f[1] != name)
    allowed = (f"a smaller value: {what} would sample up to {rows:,} responses of up to {max_tokens:,} tokens, "
               f"at least {_gb(need)} of memory, more than this machine's {_gb(have)} (lower {name} or {others})")
    raise ConfigError(f"{owner}.{name} = {value!r} is invalid: expected {allowed}", owner=owner, field=name,
                      value=value, allowed=allowed)


def check_context(longest_prompt: int, max_tokens: int, context: int | None, cap_owner: str,
                  data_option: str, data: str, longest_problem: str) -> None:
    """Raise :class:`~deepgrpo.config.ConfigError` unless the longest prompt plus a response of
    ``max_tokens`` fits in the model's ``context`` (``max_position_embeddings``; None = no
    limit known): a prompt that alone fills the context names ``data_option`` and the problem,
    otherwise the response cap (``cap_owner.max_response_tokens``) is named with its largest
    allowed value."""
    if context is None:
        return
    if longest_prompt >= context:
        raise ConfigError(f"{data_option} = {data!r} is invalid: {longest_problem} has a prompt of {longest_prompt} "
                          f"tokens, which leaves no room for a response in the model's context of {context} tokens "
                          "(max_position_embeddings); remove it or use a model with a longer context",
                          owner=data_option, value=data)
    if longest_prompt + max_tokens > context:
        raise invalid(cap_owner, "max_response_tokens", max_tokens,
                      f"an integer in [1, {context - longest_prompt}]: the longest prompt is {longest_prompt} tokens "
                      f"and the model's context (max_position_embeddings) is {context} tokens")


def uses_next_entropy(estimator: Any) -> bool:
    """Whether ``estimator`` (or the one a :class:`~deepgrpo.distributed.GatheredEstimator` wraps,
    its ``inner``) reads the candidate feature ``next_entropy`` (its ``feature_names``), so that a
    backend must supply ``cand_next_entropy`` (``LLMBackend(entropy_feature=True)``)."""
    inner = getattr(estimator, "inner", estimator)
    return "next_entropy" in tuple(getattr(inner, "feature_names", ()))


class LLMBackend:
    """The LLM backend (see the module docstring).

    Args:
        policy: trainable causal LM (the engine samples from it).
        reference: frozen causal LM for the KL term (may be None when ``kl_coef == 0``).
        tokenizer: decodes responses for the rewards.
        engine: rollout engine sampling from ``policy``.
        segmenter: response token ids -> segment ends.
        sampling: :class:`SamplingConfig`.
        seed: seeds the generator that draws one engine seed per ``sample`` call (its state is
            part of :meth:`state_dict`, so resumed runs sample the same tokens).
        logprob_chunk_size: rows per forward pass in :meth:`logprobs`.
        bf16: run the trainer's forward passes under bfloat16 autocast on the model's device (CPU
            or CUDA; the weights stay float32; adds a rollout-vs-trainer mismatch).
        reward_fn: ``(problem, response_text, truncated) -> float`` replacing the task's
            verifier (None = :func:`llm.rewards.score` on ``problem.task``).
        entropy_feature: compute the candidate feature ``next_entropy`` (``cand_next_entropy``
            on main rollouts) by a no-grad forward pass of the policy when the engine does not
            report entropies (vLLM); an engine that reports them (HF) needs no extra pass.
            Set it when the estimator uses the feature (:func:`uses_next_entropy`).
    """

    def __init__(self, policy: Any, reference: Any | None, tokenizer: Any, engine: RolloutEngine,
                 segmenter: Segmenter, sampling: SamplingConfig | None = None, seed: int = 0,
                 logprob_chunk_size: int = 64, bf16: bool = False,
                 reward_fn: Callable[[Problem, str, bool], float] | None = None,
                 entropy_feature: bool = False) -> None:
        self.policy = policy
        self.reference = reference
        self.tokenizer = tokenizer
        self.engine = engine
        self.segmenter = segmenter
        self.sampling = sampling or SamplingConfig()
        self.rng = np.random.default_rng(seed)
        self.logprob_chunk_size = int(logprob_chunk_size)
        self.bf16 = bool(bf16)
        self.entropy_feature = bool(entropy_feature)
        self.stop_token_ids = [int(tokenizer.eos_token_id)]
        self.reward_fn = reward_fn or (lambda p, text, trunc: score(p.task, text, p.answer, truncated=trunc))
        self.reset_diagnostics()

    # -- Backend protocol ----------------------------------------------------------------------
    def sample(self, requests: Sequence[SampleRequest]) -> Rollouts:
        """Continuations of ``prompt ids + prefix ids`` for each request (rows in request order)."""
        prompts: list[Prompt] = [r.prompt for r in requests]
        prefixes = [[] if r.prefix is None else [int(t) for t in r.prefix.tolist()] for r in requests]
        cap = self.sampling.max_response_tokens
        gens = self.engine.generate([list(p.ids) for p in prompts], [int(r.n) for r in requests],
                                    max_new_tokens=[max(cap - len(pf), 0) for pf in prefixes],
                                    temperature=self.sampling.temperature, top_p=self.sampling.top_p,
                                    prefixes=prefixes, stop_token_ids=self.stop_token_ids,
                                    seed=int(self.rng.integers(0, 2**62)))
        owner = [i for i, r in enumerate(requests) for _ in range(int(r.n))]
        B = len(gens)
        T = max([len(g.token_ids) for g in gens], default=0)
        tokens = torch.zeros(B, T, dtype=torch.long)  # [B, T] suffix tokens
        logprobs = torch.zeros(B, T)  # [B, T]
        mask = torch.zeros(B, T, dtype=torch.bool)  # [B, T]
        rewards = torch.zeros(B)  # [B]
        truncated = torch.zeros(B, dtype=torch.bool)  # [B]
        finished = torch.zeros(B, dtype=torch.bool)  # [B]
        ends: list[torch.Tensor] = []
        for b, (g, i) in enumerate(zip(gens, owner)):
            S = len(g.token_ids)
            if S:
                tokens[b, :S] = torch.tensor(g.token_ids, dtype=torch.long)
                logprobs[b, :S] = torch.tensor(g.logprobs, dtype=torch.float32)
                mask[b, :S] = True
            full = prefixes[i] + g.token_ids
            text = self.tokenizer.decode(full, skip_special_tokens=True)
            problem = prompts[i].problem
            rewards[b] = float(self.reward_fn(problem, text, g.truncated))
            truncated[b] = g.truncated
            finished[b] = g.finished
            ends.append(self.segmenter(full))
        extras = {"finished": finished}
        if B and all(r.prefix is None for r in requests):
            # main chains: the candidate feature next_entropy (deepgrpo.explore.CANDIDATE_EXTRA_PREFIX),
            # the entropy of the sampling distribution after t response tokens, 0 at and after the end
            if all(g.entropies is not None for g in gens):
                ent = torch.zeros(B, T + 1, dtype=torch.float64)  # [B, T+1]
                for b, g in enumerate(gens):
                    if g.token_ids:
                        ent[b, :len(g.token_ids)] = torch.tensor(g.entropies, dtype=torch.float64)
                extras["cand_next_entropy"] = ent
            elif self.entropy_feature:
                extras["cand_next_entropy"] = self.next_entropy([prompts[i] for i in owner], tokens, mask)
        return Rollouts(tokens=tokens, logprobs=logprobs, mask=mask, rewards=rewards, segment_ends=ends,
                        truncated=truncated, extras=extras)

    def logprobs(self, batch: Batch, model: str = "policy") -> torch.Tensor:
        """``[B, T]`` log-probs of ``batch.tokens`` given prompt + preceding tokens at the sampling
        temperature (policy: with gradient; reference: without). Policy calls also record the
        diagnostics of :meth:`diagnostics` (entropy, mismatch with ``batch.old_logprobs``)."""
        if model == "policy":
            net, grad = self.policy, torch.is_grad_enabled()
        elif model == "reference":
            if self.reference is None:
                raise ValueError("logprobs(model='reference') needs a reference model")
            net, grad = self.reference, False
        else:
            raise ValueError(f"model = {model!r} is invalid: expected policy or reference")
        prompts = [batch.prompts[i] for i in batch.prompt_index.tolist()]
        parts = []
        for s in range(0, len(batch), self.logprob_chunk_size):
            rows = slice(s, s + self.logprob_chunk_size)
            with torch.set_grad_enabled(grad):
                lp, ent = self._token_logprobs(net, prompts[rows], batch.tokens[rows], batch.response_mask[rows],
                                               with_entropy=model == "policy")
            if model == "policy":
                self._record(lp.detach(), ent, batch.old_logprobs[rows], batch.response_mask[rows])
            parts.append(lp)
        if not parts:
            return torch.zeros(batch.tokens.shape)
        return torch.cat(parts)

    # -- internals ---------------------------------------------------------------------------------
    def next_entropy(self, prompts: Sequence[Prompt], tokens: torch.Tensor, response_mask: torch.Tensor
                     ) -> torch.Tensor:
        """``DoubleTensor [B, T+1]``: the entropy (nats) of the policy's sampling distribution
        (:attr:`sampling`'s temperature and top-p, :func:`llm.engine.sampling_log_probs`) of
        response token t given the prompt and tokens ``< t``, 0 at and after each row's end.

        One no-grad forward pass of the policy over ``prompts[b]`` + ``tokens[b]`` ``[B, T]``
        (``response_mask`` ``[B, T]``, a prefix of each row), ``logprob_chunk_size`` rows at a
        time, with the policy in eval mode (as the engine samples); the candidate feature
        ``next_entropy`` of an engine that reports no entropies.
        """
        B, T = tokens.shape
        out = torch.zeros(B, T + 1, dtype=torch.float64)  # [B, T+1]
        if B == 0 or T == 0:
            return out
        temp, top_p = self.sampling.temperature, self.sampling.top_p
        was_training = self.policy.training
        self.policy.eval()
        try:
            with torch.no_grad():
                for s in range(0, B, self.logprob_chunk_size):
                    rows = slice(s, s + self.logprob_chunk_size)
                    logits = self._response_logits(self.policy, prompts[rows], tokens[rows],
                                                   response_mask[rows])  # [b, T, V]
                    ent = distribution_entropy(sampling_log_probs(logits, temp, top_p)).cpu()  # [b, T]
                    out[rows, :T] = torch.where(response_mask[rows], ent.double(), 0.0)
        finally:
            self.policy.train(was_training)
        return out

    def _response_logits(self, net: Any, prompts: Sequence[Prompt], tokens: torch.Tensor,
                         response_mask: torch.Tensor) -> torch.Tensor:
        """``[b, T, V]`` float logits that predict response token t of ``tokens`` ``[b, T]`` given
        the prompt and tokens ``< t``: one forward pass of ``net`` over the left-padded prompts
        followed by the responses (``response_mask`` ``[b, T]``; masked positions are padding),
        with explicit position ids, under bfloat16 autocast with ``bf16``. Gradients flow if
        they are enabled."""
        dev = next(net.parameters()).device
        b, T = tokens.shape
        Lp = max(len(p.ids) for p in prompts)
        pad = int(self.tokenizer.pad_token_id)
        ids = torch.full((b, Lp + T), pad, dtype=torch.long)  # [b, Lp+T] left-padded prompt, then response
        attn = torch.zeros(b, Lp + T, dtype=torch.long)
        for j, p in enumerate(prompts):
            ids[j, Lp - len(p.ids):Lp] = torch.tensor(p.ids, dtype=torch.long)
            attn[j, Lp - len(p.ids):Lp] = 1
        ids[:, Lp:] = torch.where(response_mask, tokens, torch.full_like(tokens, pad))
        attn[:, Lp:] = response_mask.long()
        position = (attn.cumsum(-1) - 1).clamp(min=0)
        ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with ctx:
            out = net(input_ids=ids.to(dev), attention_mask=attn.to(dev), position_ids=position.to(dev),
                      use_cache=False)
        return out.logits[:, Lp - 1:Lp + T - 1, :].float()  # [b, T, V] predicts response token t

    def _token_logprobs(self, net: Any, prompts: Sequence[Prompt], tokens: torch.Tensor,
                        response_mask: torch.Tensor, with_entropy: bool
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs ``[b, T]`` (and entropies ``[b, T]``) of response ``tokens`` [b, T] under
        softmax(logits / T) over the whole vocabulary (the nucleus is ignored: see
        :class:`SamplingConfig`)."""
        logits = self._response_logits(net, prompts, tokens, response_mask)  # [b, T, V]
        logp = sampling_log_probs(logits, self.sampling.temperature, 1.0)  # [b, T, V]
        lp = logp.gather(-1, tokens.to(logp.device).unsqueeze(-1)).squeeze(-1)  # [b, T]
        ent = None
        if with_entropy:
            with torch.no_grad():
                ent = -(logp.exp() * logp).sum(-1).cpu()  # [b, T]
        return lp.cpu() if lp.device.type != "cpu" else lp, ent

    def reset_diagnostics(self) -> None:
        """Zero the accumulators read by :meth:`diagnostics`."""
        self._diag = {"tokens": 0.0, "entropy": 0.0, "abs_diff": 0.0, "max_abs_diff": 0.0}

    def _record(self, lp: torch.Tensor, ent: torch.Tensor | None, old: torch.Tensor, mask: torch.Tensor) -> None:
        m = mask.bool()
        n = float(m.sum())
        if n == 0:
            return
        diff = (lp - old).abs()[m]
        self._diag["tokens"] += n
        self._diag["abs_diff"] += float(diff.sum())
        self._diag["max_abs_diff"] = max(self._diag["max_abs_diff"], float(diff.max()))
        if ent is not None:
            self._diag["entropy"] += float(ent[m].sum())

    def diagnostics(self) -> dict[str, float]:
        """Since the last reset, over response tokens of policy ``logprobs`` calls: mean token
        ``entropy``, mean and max |trainer log-prob - rollout log-prob| (``logprob_mismatch``,
        ``logprob_mismatch_max``; ~0 for the HF engine in float32)."""
        n = max(self._diag["tokens"], 1.0)
        return {"entropy": self._diag["entropy"] / n, "logprob_mismatch": self._diag["abs_diff"] / n,
                "logprob_mismatch_max": self._diag["max_abs_diff"]}

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
