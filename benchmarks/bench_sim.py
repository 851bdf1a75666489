"""Simulator performance: sampler throughput, the cost of a training step, and the wall time of
``deepgrpo sim compare``.

    python benchmarks/bench_sim.py [--batch 65536] [--seconds 2] [--skip-steps] [--skip-compare]
                                   [--skip-replicas] [--skip-quick-map] [--replicas 1,16,256]
                                   [--baseline DIR]

Prints (targets of the simulator issues, checked here rather than by timed tests):
* generated tokens per second of R runs trained in lockstep (:func:`sims.runner.train_replicas`)
  at R = 1, 16 and 256 (``--replicas``) against runs trained one at a time, on an equal-token mix
  of tabular/features x GRPO/DEEP-GRPO (target: x15 at R = 256); with ``--baseline DIR`` the
  one-at-a-time figure is that tree's (e.g. a checkout from before the replica axis);
* the wall time of the quick regime map as a ratio to ``import torch`` (target: at most 6 s);
* simulated tokens per second of the vectorised sampler, from the root and continuing prefixes
  (target: >= 10 million / s on one thread);
* the time per training step (:func:`sims.runner.train` to 100,000 tokens: features and tabular
  policies, GRPO and DEEP-GRPO) with each step's tables computed once (a
  :class:`~sims.policy.PolicySnapshot` per set of weights) against recomputing them on every call
  (:func:`sims.policy.fresh_snapshots`, the numbers are the same), interleaved in one process;
  with ``--baseline DIR`` also against another version of the ``sims`` package (a directory
  holding ``sims/``, e.g. written by ``git show REV:sims/FILE.py``), each version in its own fresh
  processes, alternated. Ratios, not absolute times, are the figures to read on a shared machine;
* the wall time and CPU time of ``deepgrpo sim compare`` with its defaults, run as a fresh
  process exactly as a user would, and of ``python -c "import torch"`` measured in the same
  run, interleaved (``--repeats`` times each, medians), and their ratio (target: compare <= 2x
  ``import torch``). The ratio is the figure that matters: other processes on the machine
  inflate both wall times alike. The children run with bytecode caching on (as a user's
  Python does; a first, untimed run writes the caches), whatever ``PYTHONDONTWRITEBYTECODE``
  says in this process.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

COMPARE_TO_TORCH_TARGET = 2.0
"""``deepgrpo sim compare`` may take at most this many times the wall time of ``import torch``."""


def sampler_throughput(batch: int, seconds: float, with_prefix: bool) -> float:
    import torch

    from sims.policy import TokenTreePolicy
    from sims.sampler import sample_chains
    from sims.spec import TokenTreeSpec

    problems = TokenTreeSpec().build()
    policy = TokenTreePolicy(problems)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        log_probs = policy.log_probs()
    problem = torch.randint(0, problems.n, (batch,), generator=gen)
    prefix = plen = None
    if with_prefix:
        prefix = sample_chains(problems, log_probs, problem, gen).tokens
        plen = torch.randint(0, problems.T, (batch,), generator=gen)
    sample_chains(problems, log_probs, problem, gen, prefix, plen)  # warm-up
    tokens, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        sample_chains(problems, log_probs, problem, gen, prefix, plen)
        tokens += batch * problems.T if plen is None else int((problems.T - plen).sum())
    return tokens / (time.perf_counter() - t0)


STEP_WORKLOADS = (("features", "deep-grpo"), ("features", "grpo"), ("tabular", "deep-grpo"), ("tabular", "grpo"))
"""(policy class, method) of the training runs whose per-step cost is measured."""
STEP_BUDGET = 100_000
"""Generated tokens of each measured training run (default spec, Adam, batch of 16 problems)."""


def step_times(fresh: bool = False) -> dict[str, float]:
    """Mean wall time per training step (seconds; setup excluded) of each :data:`STEP_WORKLOADS`
    run, with the step tables reused (or, with ``fresh``, recomputed on every call)."""
    import contextlib

    from deepgrpo.methods import method_config
    from sims.runner import RunnerConfig, train
    from sims.spec import TokenTreeSpec

    out = {}
    for policy, method in STEP_WORKLOADS:
        cfg = RunnerConfig(steps=10_000, budget=STEP_BUDGET, budget_unit="tokens", policy=policy)
        if fresh:
            from sims.policy import fresh_snapshots
            ctx = fresh_snapshots()
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            res = train(TokenTreeSpec(), method_config(method), cfg, seed=0, method=method)
        out[f"{policy} {method}"] = sum(res.step_wall_time_s) / len(res.step_wall_time_s)
    return out


REPLICA_BUDGET = 20_000
"""Generated tokens of every run in the replica figures (each workload's runs spend the same)."""
SEQUENTIAL_RUNS = 8
"""Runs trained one at a time per workload for the unbatched figure."""


def replica_tokens_per_s(R: int, budget: int = REPLICA_BUDGET) -> float:
    """Generated tokens per second of ``R`` runs trained together (:func:`sims.runner.train_replicas`),
    over an equal-token mix of :data:`STEP_WORKLOADS` (every run spends ``budget``); R = 0 trains
    :data:`SEQUENTIAL_RUNS` runs per workload one at a time with :func:`sims.runner.train` (this also
    works on a tree from before the replica axis: the ``--baseline`` figure). Setup included."""
    from deepgrpo.methods import method_config
    from sims import runner
    from sims.spec import TokenTreeSpec

    tokens, seconds = 0, 0.0
    for policy, method in STEP_WORKLOADS:
        cfg = runner.RunnerConfig(steps=10_000, budget=budget, budget_unit="tokens", policy=policy)
        algo = method_config(method)
        t0 = time.perf_counter()
        if R == 0:
            results = [runner.train(TokenTreeSpec(), algo, cfg, seed=s, method=method) for s in range(SEQUENTIAL_RUNS)]
        else:
            results = runner.train_replicas([TokenTreeSpec()] * R, algo, [cfg] * R, list(range(R)), [method] * R)
        seconds += time.perf_counter() - t0
        tokens += sum(r.ledger.totals()["tokens"] for r in results)
    return tokens / seconds


def replica_lines(sizes: list[int], repeats: int, baseline: str | None) -> list[str]:
    """Tokens/s at each R in ``sizes`` against runs one at a time (this tree's R = 1 path and, with
    ``baseline``, that tree's per-run loop), each figure in a fresh process, alternated ``repeats``
    times; medians and their ratios."""
    import json
    from pathlib import Path
    here = str(Path(__file__).resolve().parents[1])
    jobs = [("one at a time" + (f" ({baseline})" if baseline else ""), baseline or here, 0)]
    jobs += [(f"R = {R}", here, R) for R in sizes]
    rates: dict[str, list[float]] = {name: [] for name, _, _ in jobs}
    for _ in range(repeats):
        for name, path, R in jobs:
            env = _child_env()
            env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
            proc = subprocess.run([sys.executable, __file__, "--emit-replicas", str(R)], capture_output=True,
                                  text=True, env=env, check=True)
            rates[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = statistics.median(rates[jobs[0][0]])
    lines = []
    for name, _, _ in jobs:
        m = statistics.median(rates[name])
        lines.append(f"  {name:<40} {m / 1e3:9,.0f} k tokens/s   x{m / base:5.1f} "
                     f"(rounds: {' '.join(f'{r / 1e3:,.0f}k' for r in rates[name])})")
    return lines


def quick_map_vs_torch(repeats: int) -> tuple[float, float]:
    """Median wall times of ``deepgrpo study regime-map --quick --seeds 2`` (a fresh directory each
    time) and of ``python -c "import torch"``, interleaved ``repeats`` times after a warm-up."""
    torch_cmd = [sys.executable, "-c", "import torch"]
    walls: dict[str, list[float]] = {"torch": [], "map": []}
    with tempfile.TemporaryDirectory() as tmp:
        def map_cmd(i: int) -> list[str]:
            return [sys.executable, "-m", "deepgrpo.cli", "study", "regime-map", "--quick", "--seeds", "2",
                    "--out", os.path.join(tmp, str(i))]
        timed(map_cmd(-1))  # warm-up
        for i in range(repeats):
            walls["torch"].append(timed(torch_cmd)[0])
            wall, _, code = timed(map_cmd(i))
            if code:
                raise SystemExit("the quick regime map failed")
            walls["map"].append(wall)
    return statistics.median(walls["map"]), statistics.median(walls["torch"])


def _ratio_lines(new: list[dict[str, float]], old: list[dict[str, float]], what: str) -> list[str]:
    lines = []
    for key in new[0]:
        ratios = [n[key] / o[key] for n, o in zip(new, old)]
        new_ms, old_ms = (statistics.median(r[key] for r in rows) * 1e3 for rows in (new, old))
        lines.append(f"  {key:<20} {new_ms:7.2f} ms/step vs {old_ms:7.2f} ({what}): ratio "
                     f"{statistics.median(ratios):.2f} (rounds: {' '.join(f'{r:.2f}' for r in ratios)})")
    return lines


def reuse_vs_fresh(repeats: int) -> list[str]:
    """Per-step time with the step tables reused vs recomputed, interleaved ``repeats`` times."""
    step_times()  # warm-up
    new, old = [], []
    for _ in range(repeats):
        new.append(step_times())
        old.append(step_times(fresh=True))
    return _ratio_lines(new, old, "recomputing every table")


def versus_baseline(baseline: str, repeats: int) -> list[str]:
    """Per-step time of this tree's ``sims`` vs the one in ``baseline``, each in fresh processes,
    alternated ``repeats`` times (children print :func:`step_times` as JSON)."""
    import json
    from pathlib import Path
    here = str(Path(__file__).resolve().parents[1])
    runs: dict[str, list[dict[str, float]]] = {"new": [], "old": []}
    for _ in range(repeats):
        for tag, path in (("old", baseline), ("new", here)):
            env = _child_env()
            env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
            proc = subprocess.run([sys.executable, __file__, "--emit-step-times"], capture_output=True, text=True,
                                  env=env, check=True)
            runs[tag].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return _ratio_lines(runs["new"], runs["old"], f"sims of {baseline}")


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # a user's Python caches bytecode
    return env


def timed(argv: list[str], echo: bool = False) -> tuple[float, float, int]:
    """(wall s, CPU s of the child process, exit code) of running ``argv`` as a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=_child_env())
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
    elif echo:
        print(proc.stdout)
    return wall, cpu, proc.returncode


def compare_vs_torch(repeats: int) -> dict[str, float]:
    """Wall and CPU medians of ``deepgrpo sim compare`` (defaults, figure included) and of
    ``python -c "import torch"``, interleaved ``repeats`` times after one untimed warm-up run."""
    torch_cmd = [sys.executable, "-c", "import torch"]
    with tempfile.TemporaryDirectory() as out:
        compare_cmd = [sys.executable, "-m", "deepgrpo.cli", "sim", "compare", "--out", out]
        timed(compare_cmd)  # warm-up: bytecode caches, file-system caches
        runs: dict[str, list[tuple[float, float, int]]] = {"torch": [], "compare": []}
        for i in range(repeats):
            runs["torch"].append(timed(torch_cmd))
            runs["compare"].append(timed(compare_cmd, echo=i == repeats - 1))
    med = {f"{k}_{what}": statistics.median(r[j] for r in v) for k, v in runs.items()
           for j, what in ((0, "wall"), (1, "cpu"))}
    med["exit"] = max(r[2] for v in runs.values() for r in v)
    return med


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=65536, help="chains per sampler call")
    p.add_argument("--seconds", type=float, default=2.0, help="measuring time per sampler figure")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads for the sampler")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of `sim compare` and of `import torch`")
    p.add_argument("--skip-compare", action="store_true")
    p.add_argument("--skip-steps", action="store_true", help="skip the per-training-step figures")
    p.add_argument("--step-repeats", type=int, default=3, help="interleaved rounds of the per-step figures")
    p.add_argument("--baseline", default=None, metavar="DIR",
                   help="a directory holding another version of the project (deepgrpo and sims) to time training "
                        "steps and runs one at a time against")
    p.add_argument("--emit-step-times", action="store_true", help=argparse.SUPPRESS)  # a --baseline child
    p.add_argument("--emit-replicas", type=int, default=None, help=argparse.SUPPRESS)  # a replica-figure child
    p.add_argument("--replicas", default="1,16,256", help="comma-separated batch sizes R of the replica figures")
    p.add_argument("--skip-replicas", action="store_true", help="skip the many-runs-in-lockstep figures")
    p.add_argument("--skip-quick-map", action="store_true", help="skip the quick regime map's time")
    args = p.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    if args.emit_replicas is not None:
        import json
        print(json.dumps(replica_tokens_per_s(args.emit_replicas)))
        return 0
    if args.emit_step_times:
        import json
        step_times()  # warm-up
        print(json.dumps(step_times()))
        return 0
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; torch {torch.__version__}, "
          f"{args.threads} thread(s)")
    for with_prefix in (False, True):
        rate = sampler_throughput(args.batch, args.seconds, with_prefix)
        what = ("continuations of random prefixes, generated suffix tokens only" if with_prefix
                else "chains from the root")
        print(f"sampler ({what}, B={args.batch:,}): {rate / 1e6:.1f} M simulated tokens/s "
              f"(target >= 10 M/s: {'ok' if rate >= 1e7 else 'MISSED'})")
    if not args.skip_steps:
        budget = f"to {STEP_BUDGET:,} tokens, default spec, Adam"
        print(f"training step, step tables computed once per set of weights vs recomputed on every call ({budget}; "
              "same numbers):")
        print("\n".join(reuse_vs_fresh(args.step_repeats)))
        if args.baseline:
            print(f"training step, this tree's sims vs {args.baseline} ({budget}; fresh processes, alternated):")
            print("\n".join(versus_baseline(args.baseline, args.step_repeats)))
    if not args.skip_replicas:
        sizes = [int(x) for x in args.replicas.split(",")]
        print(f"many runs in lockstep: generated tokens/s over an equal-token mix of tabular/features x GRPO/DEEP-GRPO "
              f"({REPLICA_BUDGET:,} tokens per run, default spec, Adam; setup included; each figure a fresh process, "
              f"alternated {args.step_repeats} times; target x15 at R = 256 against runs one at a time):")
        print("\n".join(replica_lines(sizes, args.step_repeats, args.baseline)))
    if not args.skip_quick_map:
        qm, tw = quick_map_vs_torch(args.repeats)
        print(f"`deepgrpo study regime-map --quick --seeds 2` (fresh process): {qm:.2f} s wall, {qm / tw:.1f}x "
              f"`import torch` ({tw:.2f} s; medians of {args.repeats}; target <= 6 s)")
    if not args.skip_compare:
        m = compare_vs_torch(args.repeats)
        ratio = m["compare_wall"] / m["torch_wall"]
        ok = ratio <= COMPARE_TO_TORCH_TARGET and m["exit"] == 0
        print(f"`python -c \"import torch\"`: {m['torch_wall']:.2f} s wall, {m['torch_cpu']:.2f} s CPU (median of "
              f"{args.repeats})")
        print(f"`deepgrpo sim compare` (defaults, figure included, fresh process): {m['compare_wall']:.2f} s wall, "
              f"{m['compare_cpu']:.2f} s CPU (median of {args.repeats}), exit {int(m['exit'])}")
        print(f"sim compare / import torch wall-time ratio: {ratio:.2f}x (target <= {COMPARE_TO_TORCH_TARGET:g}x: "
              f"{'ok' if ok else 'MISSED'}); CPU-time ratio {m['compare_cpu'] / m['torch_cpu']:.2f}x; "
              f"load average now {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
