"""GPU acceptance check: the GPU paths of the LLM backend, run once, in at most 8 minutes.

    python benchmarks/gpu_check.py [--out FILE] [--items trainer,trl,branch_cost] [--workdir DIR]
    python benchmarks/gpu_check.py --cpu-dry-run [--out FILE]     # the same code, micro sizes, on a CPU

Everything runs on a model built from a config with Qwen2.5-0.5B's shapes (24 layers, hidden
size 896, 14 query / 2 key-value heads, MLP 4864, vocabulary 151,936, tied embeddings; random
weights, nothing downloaded) and the project's character tokenizer padded with reserved tokens to
that vocabulary. Weights are float32 and bfloat16 is used as a real run uses it: our trainer's
``bf16`` (its forward passes under autocast; generation in float32), TRL's ``bf16=True``, and
autocast around the branch-cost generations. Rewards are a fixed pseudo-random 0/1 function of the response text
(the parity of its crc32): a random-weight model never solves a task, and mixed groups are
needed for non-zero advantages, branches and a loss that trains something.

Items (each runs under a time cap; an exception or a cap is recorded as FAIL with its one-line
error and the next item still runs):

1. ``trainer``: our trainer (:class:`llm.trainer.Trainer`, HF engine) runs 2 steps of ``grpo``
   and 2 steps of ``deep-grpo`` (``Trainer.train_step``: explore -> update_policy -> sync).
   Reported per method: s/step, generated tokens/s (tokens over the time spent in the engine's
   ``generate``), peak memory, the rollout-vs-trainer log-prob mismatch (mean and max), losses.
   Checked: every loss and gradient norm is finite, every step took an optimizer step,
   deep-grpo branched, and the gradient of the core's loss (``update_policy`` ->
   ``dual_stream_loss``) with respect to the policy's per-token log-probs is exactly 0 on every
   aux row's prefix tokens (non-zero on its suffix), captured during the real training steps.
2. ``trl``: :class:`llm.trl_trainer.DeepGRPOTrainer` runs 2 steps with the same model (TRL's
   transformers generation). Same figures (TRL's transformers path returns no sampling
   log-probs, so the mismatch is reported as not available) and the same checks, the
   zero-gradient one on TRL's own log-prob tensor. SKIPPED, with the reason, when trl cannot be
   imported (it is absent, or a package it needs, such as ``datasets``, is).
3. ``branch_cost``: ``benchmarks/bench_branch_cost.py``'s measurement (its ``measure``) on the
   HF engine: K continuations from a pivot at relative depth 0.25, 0.5 and 0.75 of a main chain
   versus K root generations; medians over repetitions of the time ratio, next to the suffix
   share 1 - d. Checked: every depth measured with finite positive ratios. The goal
   ratio / (1 - d) <= 1.2 is reported (``goal_met``), not checked.

Output: one JSON document (printed; with ``--out`` also written atomically), schema
``deepgrpo-gpu-check/1``::

    {"schema", "mode": "gpu" | "cpu-dry-run", "status": "PASS" | "FAIL" ("INCOMPLETE" while it runs), "wall_s",
     "time_budget_s", "started": ISO time, "device": {...}, "versions": {...},
     "packages": {name: {"found": bool, "version": str | null}},
     "optional_modules_imported": [...],       # of gymnasium, datasets, math_verify, vllm, trl
     "sizes": {"model": {...}, "prompts_per_step", "G", "K", "max_response_tokens", ...},
     "setup": {"status", "wall_s", "error", ...},
     "order": [item names in the order they ran],
     "items": {"trainer" | "trl" | "branch_cost": {
         "status": "PASS" | "FAIL" | "SKIPPED", "wall_s", "cap_s",
         "error": one line | null, "reason": why skipped | null, "traceback": text | null,
         "checks": {name: bool}, ...figures}}}

    figures of items 1-2: "runs": {"grpo" | "deep-grpo": {"steps", "s_per_step": [per step; the
    first includes warm-up], "s_per_step_mean", "s_per_step_last", "generate_s", "generated_tokens",
    "gen_tokens_per_s", "gen_tokens_per_s_mean", "peak_mem_gb", "peak_mem_source",
    "logprob_mismatch", "logprob_mismatch_max" (per step; null for TRL, with
    "logprob_mismatch_note"), "loss", "grad_norm", "reward_main", "rollouts_aux", "tokens_main",
    "tokens_aux", "pivots", ..., "aux_prefix_zero_grad": {"computed", "passed",
    "aux_rows_checked", "prefix_tokens_checked", "max_abs_grad_on_prefix",
    "aux_rows_with_nonzero_suffix_grad", "max_abs_grad_on_padding", "backward_tensors"}}}
    figures of item 3: "depths": [{"depth", "suffix_fraction", "ratio_wall", "ratio_cpu",
    "ratio_over_suffix_wall", "ratio_over_suffix_cpu", "root_wall_s", "branch_wall_s",
    "root_tokens_per_s"}], "worst_ratio_over_suffix_wall", "goal_met", "peak_mem_gb",
    "repetitions": [bench_branch_cost's rows]

Exit code 0 only if every item that was not skipped passed. ``--cpu-dry-run`` runs the same
code on a CPU with micro sizes (float32), in well under a minute.

Needs only torch, transformers (with tokenizers) and numpy besides this repository (plus trl,
accelerate and datasets for item 2); never imports gymnasium, datasets, math-verify or vLLM
itself. Nothing is downloaded (``HF_HUB_OFFLINE=1`` unless set).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

SCHEMA = "deepgrpo-gpu-check/1"
ITEMS = ("trainer", "trl", "branch_cost")
OPTIONAL_MODULES = ("gymnasium", "datasets", "math_verify", "vllm", "trl")
"""Modules the GPU machine may lack; reported if this run imported them."""
PACKAGES = ("torch", "transformers", "tokenizers", "accelerate", "numpy", "safetensors", "trl", "datasets",
            "pyarrow", "math_verify", "vllm", "gymnasium")

QWEN25_05B_SHAPE = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                    "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
                    "rms_norm_eps": 1e-6, "tie_word_embeddings": True}
"""Qwen2.5-0.5B's shapes (its config.json), built as a transformers ``Qwen2Config`` with random weights."""
MICRO_SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 1, "vocab_size": 64, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
               "tie_word_embeddings": True}
"""The same architecture (grouped-query attention, tied embeddings) at micro size, for ``--cpu-dry-run``."""


@dataclass(frozen=True)
class Sizes:
    """What every item runs with (written to the JSON under ``sizes``).

    model: ``Qwen2Config`` fields. prompts_per_step, G, K, max_response_tokens, steps: the
    training steps of items 1-2 (fixed-size segments of ``segment_tokens`` give the pivot
    candidates). micro_batch_size: rows per backward pass of our trainer (and per log-prob
    chunk); trl_grad_accum: TRL's gradient_accumulation_steps (its micro-batches). branch_*:
    item 3. caps: seconds per item (``setup`` builds and saves the model). time_budget_s: the
    whole run; an item not started by then is a FAIL.
    """

    model: dict[str, Any]
    prompts_per_step: int
    G: int
    K: int
    max_response_tokens: int
    segment_tokens: int
    steps: int
    micro_batch_size: int
    trl_grad_accum: int
    lr: float
    branch_K: int
    branch_length: int
    branch_prompt_len: int
    branch_reps: int
    depths: tuple[float, ...]
    caps: dict[str, float] = field(default_factory=dict)
    time_budget_s: float = 450.0


GPU_SIZES = Sizes(model=QWEN25_05B_SHAPE, prompts_per_step=4, G=8, K=8, max_response_tokens=256, segment_tokens=32,
                  steps=2, micro_batch_size=16, trl_grad_accum=8, lr=1e-6, branch_K=8, branch_length=256,
                  branch_prompt_len=16, branch_reps=3, depths=(0.25, 0.5, 0.75),
                  caps={"setup": 45.0, "trainer": 140.0, "trl": 140.0, "branch_cost": 110.0}, time_budget_s=450.0)
"""The real run. Not yet run on a GPU; estimated at about 1 minute per item on one H100, taking
HF-engine decoding of this model as launch-bound at 20-40 ms per token step whatever the batch."""
DRY_SIZES = replace(GPU_SIZES, model=MICRO_SHAPE, prompts_per_step=2, G=4, K=4, max_response_tokens=24,
                    segment_tokens=4, micro_batch_size=8, trl_grad_accum=2, lr=1e-3, branch_K=4, branch_length=24,
                    branch_prompt_len=8, branch_reps=1,
                    caps={"setup": 60.0, "trainer": 90.0, "trl": 90.0, "branch_cost": 60.0}, time_budget_s=240.0)
"""``--cpu-dry-run``: the same code at micro size (seconds on a CPU)."""


class Skip(Exception):
    """An item that cannot run on this machine (the message says why)."""


class ItemTimeout(BaseException):
    """An item's time cap was reached (a BaseException, so that libraries' ``except Exception`` pass it on)."""


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


@contextlib.contextmanager
def time_cap(seconds: float) -> Iterator[None]:
    """Raise :class:`ItemTimeout` in the main thread after ``seconds`` (SIGALRM; a no-op elsewhere)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise ItemTimeout(f"time cap of {seconds:g} s reached")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def text_parity(text: str) -> float:
    """The check's reward: 1 if the crc32 of the response text is even, else 0 (a fixed function of the text)."""
    return float(zlib.crc32(text.encode("utf-8")) % 2 == 0)


def parity_reward(completions: list[Any], **_: Any) -> list[float]:
    """:func:`text_parity` as a TRL reward function."""
    return [text_parity(c[-1]["content"] if isinstance(c, list) else c) for c in completions]


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# -- the run's context: device, precision, the model directory ---------------------------------------------

@dataclass
class Context:
    dry_run: bool
    sizes: Sizes
    workdir: Path
    seed: int
    device: Any = None  # torch.device
    model_dir: Path | None = None
    setup_error: str | None = None

    @property
    def cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda"

    def autocast(self) -> Any:
        """bfloat16 autocast on CUDA (float32 weights), nothing on the CPU dry run."""
        import torch
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()

    def sync(self) -> None:
        if self.cuda:
            import torch
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            import torch
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_memory(self) -> dict[str, Any]:
        """Peak memory since :meth:`reset_peak`: CUDA's allocator on a GPU, else the process's max RSS."""
        if self.cuda:
            import torch
            return {"peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9,
                    "peak_mem_reserved_gb": torch.cuda.max_memory_reserved() / 1e9,
                    "peak_mem_source": "torch.cuda.max_memory_allocated"}
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return {"peak_mem_gb": rss * 1024 / 1e9, "peak_mem_source": "process max RSS (CPU dry run, whole process)"}

    def release(self) -> None:
        gc.collect()
        if self.cuda:
            import torch
            torch.cuda.empty_cache()

    def precision(self) -> str:
        return ("float32 weights, bfloat16 autocast (CUDA)" if self.cuda or not self.dry_run
                else "float32 (CPU dry run)")


def padded_char_tokenizer(vocab_size: int) -> Any:
    """The project's character tokenizer (:func:`llm.models.build_char_tokenizer`) with reserved
    tokens ``<xN>`` appended up to ``vocab_size`` entries (built offline; they decode as text)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from llm.models import build_char_tokenizer

    base = build_char_tokenizer()
    spec = json.loads(base.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), vocab_size):
        vocab[f"<x{i}>"] = i
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token=base.bos_token,
                                   eos_token=base.eos_token, pad_token=base.pad_token, unk_token=base.unk_token,
                                   padding_side="left", clean_up_tokenization_spaces=False)


def build_model_dir(path: Path, shape: dict[str, Any], seed: int) -> dict[str, Any]:
    """Save a random-weight Qwen2 model of ``shape`` (float32) and its tokenizer in ``path``."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from llm.models import count_parameters, save_pretrained_dir

    tok = padded_char_tokenizer(shape["vocab_size"])
    cfg = Qwen2Config(**shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float()
    n = count_parameters(model)
    save_pretrained_dir(model, tok, path)
    del model
    return {"model_type": cfg.model_type, "parameters": n, "tokenizer": f"character tokenizer padded to "
            f"{len(tok)} tokens", "dir": str(path)}


# -- item 1: our trainer ------------------------------------------------------------------------------------

class CallTimer:
    """Wraps ``obj.name`` (an instance attribute shadowing the method) and sums its wall time."""

    def __init__(self, obj: Any, name: str, sync: Callable[[], None]) -> None:
        self.obj, self.name, self.sync = obj, name, sync
        self.original = getattr(obj, name)
        self.seconds = 0.0
        self.calls = 0

        def timed(*args: Any, **kwargs: Any) -> Any:
            self.sync()
            t = time.perf_counter()
            try:
                return self.original(*args, **kwargs)
            finally:
                self.sync()
                self.seconds += time.perf_counter() - t
                self.calls += 1
        setattr(obj, name, timed)

    def take(self) -> float:
        s, self.seconds = self.seconds, 0.0
        return s

    def restore(self) -> None:
        with contextlib.suppress(AttributeError):
            delattr(self.obj, self.name)


class PrefixGradProbe:
    """Records, for every policy log-prob tensor that takes part in a backward pass, its gradient
    next to the rows' stream, prefix length and response mask; :meth:`summary` checks that aux
    rows' prefix positions got exactly zero gradient."""

    def __init__(self) -> None:
        self.records: list[tuple[Any, Any, Any, Any]] = []

    def watch(self, lp: Any, stream: Any, prefix_len: Any, response_mask: Any) -> None:
        if not getattr(lp, "requires_grad", False):
            return
        info = (stream.detach().cpu(), prefix_len.detach().cpu(), response_mask.detach().bool().cpu())

        def hook(grad: Any) -> None:
            self.records.append((*info, grad.detach().float().cpu()))
        lp.register_hook(hook)

    def summary(self) -> dict[str, Any]:
        from deepgrpo.batch import AUX

        rows = prefix_tokens = nonzero_suffix = 0
        max_prefix = max_padding = 0.0
        for stream, prefix_len, mask, grad in self.records:
            if (~mask).any():
                max_padding = max(max_padding, float(grad[~mask].abs().max()))
            for r in (stream == AUX).nonzero().flatten().tolist():
                P = int(prefix_len[r])
                if P <= 0:
                    continue
                rows += 1
                prefix_tokens += P
                max_prefix = max(max_prefix, float(grad[r, :P].abs().max()))
                suffix = grad[r, P:][mask[r, P:]]
                nonzero_suffix += int(bool((suffix != 0).any()))
        return {"computed": rows > 0, "backward_tensors": len(self.records), "aux_rows_checked": rows,
                "prefix_tokens_checked": prefix_tokens, "max_abs_grad_on_prefix": max_prefix,
                "max_abs_grad_on_padding": max_padding, "aux_rows_with_nonzero_suffix_grad": nonzero_suffix,
                "passed": rows > 0 and max_prefix == 0.0 and nonzero_suffix > 0}


def run_our_trainer(ctx: Context, method: str) -> dict[str, Any]:
    """``steps`` training steps of ``method`` with :class:`llm.trainer.Trainer`; figures and the probe."""
    from llm.backend import SamplingConfig
    from llm.evaluate import EvalConfig
    from llm.trainer import TrainConfig, Trainer

    s = ctx.sizes
    overrides: dict[str, Any] = {"G": s.G}
    if method != "grpo":
        overrides["K"] = s.K
    cfg = TrainConfig(model=str(ctx.model_dir), method=method, overrides=overrides, prompts_per_step=s.prompts_per_step,
                      segmenter="fixed", segment_tokens=s.segment_tokens,
                      sampling=SamplingConfig(max_response_tokens=s.max_response_tokens), steps=s.steps, lr=s.lr,
                      lr_warmup_steps=0, micro_batch_size=s.micro_batch_size, logprob_chunk_size=s.micro_batch_size,
                      bf16=ctx.cuda,
                      eval=EvalConfig(n_problems=4, samples=1, max_response_tokens=s.max_response_tokens),
                      checkpoint_every=1000, seed=ctx.seed, threads=1 if ctx.dry_run else min(os.cpu_count() or 1, 8),
                      tensorboard=False, device="cuda" if ctx.cuda else "cpu")
    ctx.release()
    ctx.reset_peak()
    trainer = Trainer(cfg, ctx.workdir / f"trainer-{method}", progress=False)
    trainer.backend.reward_fn = lambda problem, text, truncated: text_parity(text)
    probe = PrefixGradProbe()
    original_logprobs = trainer.backend.logprobs

    def logprobs(batch: Any, model: str = "policy") -> Any:
        lp = original_logprobs(batch, model)
        if model == "policy":
            probe.watch(lp, batch.stream, batch.prefix_len, batch.response_mask)
        return lp
    trainer.backend.logprobs = logprobs
    gen = CallTimer(trainer.engine, "generate", ctx.sync)
    rows, step_s, gen_s = [], [], []
    try:
        for _ in range(s.steps):
            ctx.sync()
            t = time.perf_counter()
            row = trainer.train_step()  # bf16 as a real run has it: the trainer's forward passes (cfg.bf16)
            ctx.sync()
            step_s.append(time.perf_counter() - t)
            gen_s.append(gen.take())
            trainer.step += 1  # as Trainer.run does after each step
            rows.append(row)
    finally:
        gen.restore()
        del trainer.backend.logprobs
    mem = ctx.peak_memory()
    del trainer
    tokens = [int(r["step_tokens_main"]) + int(r["step_tokens_aux"]) for r in rows]
    out = {
        "steps": len(rows), "s_per_step": step_s, "s_per_step_mean": statistics.fmean(step_s),
        "s_per_step_last": step_s[-1],
        "generate_s": gen_s, "generated_tokens": tokens,
        "gen_tokens_per_s": [n / max(g, 1e-9) for n, g in zip(tokens, gen_s)],
        "gen_tokens_per_s_mean": sum(tokens) / max(sum(gen_s), 1e-9),
        **mem,
        "logprob_mismatch": [float(r["logprob_mismatch"]) for r in rows],
        "logprob_mismatch_max": [float(r["logprob_mismatch_max"]) for r in rows],
        "loss": [float(r["loss"]) for r in rows], "grad_norm": [float(r["grad_norm"]) for r in rows],
        "reward_main": [float(r["reward_main"]) for r in rows],
        "rollouts_main": [int(r["step_rollouts_main"]) for r in rows],
        "rollouts_aux": [int(r["step_rollouts_aux"]) for r in rows],
        "tokens_main": [int(r["step_tokens_main"]) for r in rows],
        "tokens_aux": [int(r["step_tokens_aux"]) for r in rows],
        "pivots": [float(r["pivots"]) for r in rows], "batch_rows": [int(r["batch_rows"]) for r in rows],
        "pivot_depth_mean": [float(r["pivot_depth_mean"]) for r in rows],
    }
    if method != "grpo":  # GRPO has no aux rows
        out["aux_prefix_zero_grad"] = probe.summary()
    return out


def check_trainer(ctx: Context) -> dict[str, Any]:
    runs = {m: run_our_trainer(ctx, m) for m in ("grpo", "deep-grpo")}
    ctx.release()
    deep = runs["deep-grpo"]
    checks = {
        "loss_finite": all(finite(x) for r in runs.values() for x in r["loss"]),
        "grad_norm_finite_positive": all(finite(x) and x > 0 for r in runs.values() for x in r["grad_norm"]),
        "figures_finite": all(finite(r[k]) and all(finite(x) for x in r["logprob_mismatch"] + r["gen_tokens_per_s"])
                              for r in runs.values() for k in ("s_per_step_mean", "gen_tokens_per_s_mean",
                                                               "peak_mem_gb")),
        "grpo_has_no_branches": sum(runs["grpo"]["rollouts_aux"]) == 0,
        "deep_grpo_branched": sum(deep["rollouts_aux"]) > 0,
        "aux_prefix_zero_grad": bool(deep["aux_prefix_zero_grad"]["passed"]),
    }
    return {"checks": checks, "runs": runs}


# -- item 2: DeepGRPOTrainer ----------------------------------------------------------------------------------

def import_trl_trainer() -> Any:
    """:mod:`llm.trl_trainer`, or :class:`Skip` naming what is missing."""
    if importlib.util.find_spec("trl") is None:
        raise Skip("trl is not installed (pip install 'trl==1.16.*'; it also needs datasets and pyarrow)")
    try:
        import llm.trl_trainer as trl_trainer
    except (ImportError, RuntimeError) as e:  # transformers' and trl's lazy modules wrap it in a RuntimeError
        missing = missing_module(e)
        if missing is None:
            raise
        raise Skip(f"trl is installed but cannot be imported: it needs {missing!r}, which is not installed "
                   f"(trl 1.16 requires datasets and pyarrow; pyarrow is a binary wheel) [{one_line(e)}]") from None
    return trl_trainer


def missing_module(e: BaseException) -> str | None:
    """The top-level name of a third-party module that ``e`` (or an error it was raised from) says
    is missing and that is indeed not installed here; None if ``e`` is another kind of failure."""
    seen: set[int] = set()
    err: BaseException | None = e
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ModuleNotFoundError) and err.name:
            top = err.name.split(".")[0]
            try:
                absent = importlib.util.find_spec(top) is None
            except (ImportError, ValueError):
                absent = True
            if top not in ("llm", "deepgrpo", "benchmarks") and absent:
                return top
        err = err.__cause__ or err.__context__
    return None


def check_trl(ctx: Context) -> dict[str, Any]:
    trl_trainer = import_trl_trainer()
    from bench_trl_step import step_timer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from llm.models import load_tokenizer
    from llm.tasks import ArithmeticConfig, ArithmeticStream

    s = ctx.sizes
    tok = load_tokenizer(ctx.model_dir)
    stream = ArithmeticStream(ArithmeticConfig(), seed=ctx.seed)
    dataset = trl_trainer.task_dataset([stream.problem_at(i) for i in range(64)])
    rows_per_generation = s.prompts_per_step * s.G
    args = trl_trainer.DeepGRPOConfig(
        output_dir=str(ctx.workdir / "trl"), report_to="none", save_strategy="no", use_cpu=not ctx.cuda,
        bf16=ctx.cuda, logging_steps=1, max_steps=s.steps, learning_rate=s.lr, lr_scheduler_type="constant",
        max_completion_length=s.max_response_tokens, num_generations=s.G, K=s.K,
        per_device_train_batch_size=rows_per_generation // s.trl_grad_accum,
        gradient_accumulation_steps=s.trl_grad_accum, segmenter="fixed", segment_size=s.segment_tokens,
        beta=1e-4, temperature=1.0, seed=ctx.seed, disable_tqdm=True, dataloader_num_workers=0)
    ctx.release()
    ctx.reset_peak()
    trainer = trl_trainer.DeepGRPOTrainer(model=str(ctx.model_dir), reward_funcs=parity_reward, args=args,
                                          train_dataset=dataset, processing_class=tok)
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    timer = step_timer()
    trainer.add_callback(timer)
    probe = PrefixGradProbe()
    current: dict[str, Any] = {}
    original_loss = trainer._compute_loss
    original_logps = trainer._get_per_token_logps_and_entropies

    def compute_loss(model: Any, inputs: dict[str, Any]) -> Any:
        current["inputs"] = inputs
        try:
            return original_loss(model, inputs)
        finally:
            current.clear()

    def logps(*a: Any, **k: Any) -> Any:
        out = original_logps(*a, **k)
        inputs = current.get("inputs")
        if inputs is not None:
            probe.watch(out[0], inputs["stream"], inputs["prefix_len"], inputs["completion_mask"])
        return out
    trainer._compute_loss = compute_loss
    trainer._get_per_token_logps_and_entropies = logps
    gen = CallTimer(trainer, "_generate_single_turn", ctx.sync)
    gen_s: list[float] = []

    from transformers import TrainerCallback

    class GenerationTime(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            gen_s.append(gen.take())
    trainer.add_callback(GenerationTime())
    try:
        trainer.train()
    finally:
        gen.restore()
        for name in ("_compute_loss", "_get_per_token_logps_and_entropies"):
            with contextlib.suppress(AttributeError):
                delattr(trainer, name)
    mem = ctx.peak_memory()
    logs = [h for h in trainer.state.log_history if "step_tokens_main" in h]
    del trainer
    ctx.release()
    tokens = [int(h["step_tokens_main"] + h["step_tokens_aux"]) for h in logs]
    step_s = list(timer.wall)
    run = {
        "steps": len(step_s), "s_per_step": step_s, "s_per_step_mean": statistics.fmean(step_s) if step_s else None,
        "s_per_step_last": step_s[-1] if step_s else None,
        "generate_s": gen_s, "generated_tokens": tokens,
        "gen_tokens_per_s": [n / max(g, 1e-9) for n, g in zip(tokens, gen_s)],
        "gen_tokens_per_s_mean": sum(tokens) / max(sum(gen_s), 1e-9) if gen_s else None,
        **mem,
        "logprob_mismatch": None,
        "logprob_mismatch_note": "not available: TRL's transformers generation returns no sampling log-probs (the "
                                 "ratio's denominator is the trainer's own log-prob); it exists with vLLM only",
        "loss": [float(h.get("loss", float("nan"))) for h in logs],
        "grad_norm": [float(h.get("grad_norm", float("nan"))) for h in logs],
        "reward_main": [float(h.get("reward_main", float("nan"))) for h in logs],
        "rollouts_aux": [int(h["step_rollouts_aux"]) for h in logs],
        "tokens_main": [int(h["step_tokens_main"]) for h in logs],
        "tokens_aux": [int(h["step_tokens_aux"]) for h in logs],
        "pivots": [float(h.get("pivots", float("nan"))) for h in logs],
        "aux_prefix_zero_grad": probe.summary(),
    }
    checks = {
        "ran_all_steps": len(step_s) == s.steps and len(logs) == s.steps,
        "loss_finite": bool(run["loss"]) and all(finite(x) for x in run["loss"]),
        "grad_norm_finite_positive": bool(run["grad_norm"]) and all(finite(x) and x > 0 for x in run["grad_norm"]),
        "figures_finite": all(finite(run[k]) for k in ("s_per_step_mean", "gen_tokens_per_s_mean", "peak_mem_gb")),
        "branched": sum(run["rollouts_aux"]) > 0,
        "aux_prefix_zero_grad": bool(run["aux_prefix_zero_grad"]["passed"]),
    }
    return {"checks": checks, "runs": {"deep-grpo": run}}


# -- item 3: branch cost --------------------------------------------------------------------------------------

def check_branch_cost(ctx: Context) -> dict[str, Any]:
    import torch
    from bench_branch_cost import measure

    from llm.hf_engine import HFEngine
    from llm.models import load_causal_lm, load_tokenizer

    s = ctx.sizes
    tok = load_tokenizer(ctx.model_dir)
    model = load_causal_lm(ctx.model_dir, trainable=False).to(ctx.device)
    engine = HFEngine(model, [tok.eos_token_id], tok.pad_token_id)
    gen = torch.Generator().manual_seed(ctx.seed)
    prompt = [int(tok.bos_token_id)] + torch.randint(4, len(tok), (s.branch_prompt_len - 1,), generator=gen).tolist()
    args = argparse.Namespace(length=s.branch_length, K=s.branch_K, depths=list(s.depths), reps=s.branch_reps,
                              seed=ctx.seed)
    ctx.reset_peak()
    with ctx.autocast():
        rows = measure(engine, "hf", prompt, args)
    mem = ctx.peak_memory()
    del engine, model
    ctx.release()
    summary = []
    for d in s.depths:
        sel = [r for r in rows if r["depth"] == d]
        med = {k: statistics.median(r[k] for r in sel) for k in
               ("ratio_wall", "ratio_cpu", "root_wall_s", "branch_wall_s", "suffix_fraction")}
        summary.append({"depth": d, **med, "ratio_over_suffix_wall": med["ratio_wall"] / med["suffix_fraction"],
                        "ratio_over_suffix_cpu": med["ratio_cpu"] / med["suffix_fraction"],
                        "root_tokens_per_s": s.branch_K * s.branch_length / med["root_wall_s"]})
    worst = max(r["ratio_over_suffix_wall"] for r in summary)
    checks = {
        "all_depths_measured": sorted(r["depth"] for r in summary) == sorted(s.depths)
        and all(sum(1 for r in rows if r["depth"] == d) == s.branch_reps for d in s.depths),
        "ratios_finite_positive": all(finite(r[k]) and r[k] > 0 for r in summary
                                      for k in ("ratio_wall", "ratio_cpu", "ratio_over_suffix_wall")),
    }
    return {"checks": checks, "depths": summary, "worst_ratio_over_suffix_wall": worst,
            "goal": "ratio / (1 - d) <= 1.2 (wall time)", "goal_met": worst <= 1.2, **mem, "repetitions": rows}


ITEM_FUNCTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "trainer": check_trainer, "trl": check_trl, "branch_cost": check_branch_cost}


# -- running items ---------------------------------------------------------------------------------------------

def run_item(name: str, fn: Callable[[Context], dict[str, Any]], ctx: Context, cap: float) -> dict[str, Any]:
    """Run one item under ``cap`` seconds: PASS iff it returned and every check holds; an exception is a
    FAIL with its one-line error (traceback kept), :class:`Skip` a SKIPPED with its reason."""
    rec: dict[str, Any] = {"status": "FAIL", "cap_s": cap, "error": None, "reason": None, "traceback": None,
                           "checks": {}}
    t = time.perf_counter()
    try:
        with time_cap(cap):
            if ctx.setup_error is not None:
                raise RuntimeError(f"setup failed: {ctx.setup_error}")
            result = fn(ctx)
        rec.update(result)
        failed = [k for k, ok in rec["checks"].items() if not ok]
        if not rec["checks"]:
            rec["error"] = "no check was computed"
        elif failed:
            rec["error"] = "checks failed: " + ", ".join(failed)
        else:
            rec["status"] = "PASS"
    except Skip as e:
        rec.update(status="SKIPPED", reason=str(e))
    except (Exception, ItemTimeout) as e:  # noqa: BLE001 - any failure of one item is recorded, the rest run
        rec["error"] = one_line(e)
        rec["traceback"] = traceback.format_exc(limit=30)
        sys.stderr.write(rec["traceback"])
    finally:
        rec["wall_s"] = time.perf_counter() - t
        ctx.release()
    return rec


def setup(ctx: Context, cap: float) -> dict[str, Any]:
    """Pick the device and build the model directory (shared by the items)."""
    rec: dict[str, Any] = {"status": "FAIL", "cap_s": cap, "error": None, "traceback": None}
    t = time.perf_counter()
    try:
        with time_cap(cap):
            import torch
            if ctx.dry_run:
                ctx.device = torch.device("cpu")
                torch.set_num_threads(1)
            elif not torch.cuda.is_available():
                raise RuntimeError("no CUDA device is available (torch.cuda.is_available() is False); "
                                   "on a CPU use --cpu-dry-run")
            else:
                ctx.device = torch.device("cuda")
                (torch.ones(64, 64, device=ctx.device) @ torch.ones(64, 64, device=ctx.device)).sum().item()
            rec.update(build_model_dir(ctx.workdir / "model", ctx.sizes.model, ctx.seed))
            ctx.model_dir = ctx.workdir / "model"
            rec["status"] = "PASS"
    except (Exception, ItemTimeout) as e:  # noqa: BLE001
        ctx.setup_error = rec["error"] = one_line(e)
        rec["traceback"] = traceback.format_exc(limit=30)
        sys.stderr.write(rec["traceback"])
    rec["wall_s"] = time.perf_counter() - t
    return rec


def device_info(ctx: Context) -> dict[str, Any]:
    import torch
    info: dict[str, Any] = {"type": ctx.device.type if ctx.device is not None else None,
                            "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
                            "cpu_count": os.cpu_count(), "machine": platform.machine()}
    if ctx.cuda:
        p = torch.cuda.get_device_properties(0)
        info.update(name=p.name, capability=f"{p.major}.{p.minor}", total_memory_gb=p.total_memory / 1e9,
                    count=torch.cuda.device_count(), bf16_supported=torch.cuda.is_bf16_supported())
    return info


def packages() -> dict[str, dict[str, Any]]:
    """Whether each package is importable here (without importing it) and its installed version."""
    out = {}
    for name in PACKAGES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        try:
            version = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            version = None
        out[name] = {"found": found, "version": version if found else None}
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--out", default=None, help="also write the JSON summary to this file (atomically)")
    p.add_argument("--cpu-dry-run", action="store_true", help="run the same code on a CPU with micro sizes")
    p.add_argument("--items", default=",".join(ITEMS), help=f"comma-separated subset of {','.join(ITEMS)}")
    p.add_argument("--workdir", default=None, help="directory for the model and trainer outputs (default: a "
                                                   "temporary directory, removed at the end)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    items = [x.strip() for x in a.items.split(",") if x.strip()]
    bad = [x for x in items if x not in ITEMS]
    if not items or bad:
        p.error(f"--items {a.items!r} is invalid: expected a comma-separated subset of {','.join(ITEMS)}")
    a.items = [x for x in ITEMS if x in items]
    return a


def run_check(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Set up, run the items in order and return the summary. With ``--out``, the summary so far
    (``"status": "INCOMPLETE"``) is also written after setup and after each item, so that a
    crash of the process in a later item (a CUDA fault) keeps the earlier results."""
    sizes = DRY_SIZES if args.cpu_dry_run else GPU_SIZES
    ctx = Context(dry_run=args.cpu_dry_run, sizes=sizes, workdir=workdir, seed=args.seed)
    started = time.perf_counter()
    deadline = started + sizes.time_budget_s
    summary: dict[str, Any] = {
        "schema": SCHEMA, "mode": "cpu-dry-run" if args.cpu_dry_run else "gpu",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "time_budget_s": sizes.time_budget_s,
        "sizes": {**asdict(sizes),
                  "model_shape": "Qwen2.5-0.5B" if sizes.model == QWEN25_05B_SHAPE else "micro",
                  "segmenter": "fixed", "reward": "1 if crc32(response text) is even, else 0",
                  "temperature": 1.0, "kl_coef": 1e-4},
        "order": list(args.items), "items": {}}
    log(f"setup: building the model ({summary['sizes']['model_shape']} shape) in {workdir}")
    summary["setup"] = setup(ctx, min(sizes.caps["setup"], deadline - time.perf_counter()))
    summary["sizes"]["precision"] = ctx.precision()
    log(f"setup: {summary['setup']['status']} in {summary['setup']['wall_s']:.1f} s")
    complete(summary, ctx, started, args, final=False)
    for name in args.items:
        left = deadline - time.perf_counter()
        if left < 5:
            summary["items"][name] = {"status": "FAIL", "wall_s": 0.0, "cap_s": 0.0, "checks": {}, "reason": None,
                                      "traceback": None, "error": f"not run: the time budget of "
                                      f"{sizes.time_budget_s:.0f} s was spent"}
        else:
            log(f"{name}: running (cap {min(sizes.caps[name], left):.0f} s)")
            summary["items"][name] = run_item(name, ITEM_FUNCTIONS[name], ctx, min(sizes.caps[name], left))
        r = summary["items"][name]
        log(f"{name}: {r['status']} in {r['wall_s']:.1f} s" + (f" ({r['error'] or r['reason']})"
                                                                if r["status"] != "PASS" else ""))
        complete(summary, ctx, started, args, final=name == args.items[-1])
    return summary


def complete(summary: dict[str, Any], ctx: Context, started: float, args: argparse.Namespace, final: bool) -> None:
    """Fill in the run-level fields of ``summary``; unless ``final``, write it to ``--out`` as INCOMPLETE."""
    from deepgrpo.records import versions, write_json_atomic

    statuses = [r["status"] for r in summary["items"].values()]
    summary["status"] = "FAIL" if "FAIL" in statuses else "PASS" if final else "INCOMPLETE"
    summary["wall_s"] = time.perf_counter() - started
    summary["device"] = device_info(ctx)
    summary["versions"] = versions()
    summary["packages"] = packages()
    summary["optional_modules_imported"] = sorted(m for m in OPTIONAL_MODULES if sys.modules.get(m) is not None)
    if args.out and not final:
        write_json_atomic(args.out, {**summary, "status": "INCOMPLETE"})


def log(msg: str) -> None:
    sys.stderr.write(f"[gpu_check] {msg}\n")
    sys.stderr.flush()


def quiet_transformers() -> None:
    """No "Loading weights" progress bars (warnings stay)."""
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for var, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                       ("TRL_EXPERIMENTAL_SILENCE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(var, value)
    quiet_transformers()
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        summary = run_check(args, workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            summary = run_check(args, Path(tmp))
    from deepgrpo.records import json_safe, write_json_atomic
    print(json.dumps(json_safe(summary), indent=2, sort_keys=True, allow_nan=False))
    if args.out:
        write_json_atomic(args.out, summary)
        log(f"wrote {args.out}")
    return 0 if summary["status"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
