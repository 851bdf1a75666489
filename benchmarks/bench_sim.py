"""Simulator performance: sampler throughput and the wall time of ``deepgrpo sim compare``.

    python benchmarks/bench_sim.py [--batch 65536] [--seconds 2] [--skip-compare]

Prints (targets of the simulator issues, checked here rather than by timed tests):
* simulated tokens per second of the vectorised sampler, from the root and continuing prefixes
  (target: >= 10 million / s on one thread);
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
    args = p.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; torch {torch.__version__}, "
          f"{args.threads} thread(s)")
    for with_prefix in (False, True):
        rate = sampler_throughput(args.batch, args.seconds, with_prefix)
        what = ("continuations of random prefixes, generated suffix tokens only" if with_prefix
                else "chains from the root")
        print(f"sampler ({what}, B={args.batch:,}): {rate / 1e6:.1f} M simulated tokens/s "
              f"(target >= 10 M/s: {'ok' if rate >= 1e7 else 'MISSED'})")
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
