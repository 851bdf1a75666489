"""Simulator performance: sampler throughput and the wall time of ``deepgrpo sim compare``.

    python benchmarks/bench_sim.py [--batch 65536] [--seconds 2] [--skip-compare]

Prints (targets of the simulator issue, checked here rather than by timed tests):
* simulated tokens per second of the vectorised sampler, from the root and continuing prefixes
  (target: >= 10 million / s on one thread);
* the wall time and CPU time of ``deepgrpo sim compare`` with its defaults, run as a fresh
  process exactly as a user would (target: < 5 s wall on 2 cores), with the load average,
  since other processes on the machine inflate wall time but not CPU time.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time


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


def compare_wall_time() -> tuple[float, float, int]:
    """(wall s, CPU s of the process and its children, exit code) of ``deepgrpo sim compare``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "deepgrpo.cli", "sim", "compare", "--out", out],
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
    else:
        print(proc.stdout)
    return wall, cpu, proc.returncode


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=65536, help="chains per sampler call")
    p.add_argument("--seconds", type=float, default=2.0, help="measuring time per sampler figure")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads for the sampler")
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
        wall, cpu, code = compare_wall_time()
        print(f"`deepgrpo sim compare` (defaults, fresh process): {wall:.2f} s wall, {cpu:.2f} s CPU, exit {code} "
              f"(target < 5 s wall: {'ok' if wall < 5 and code == 0 else 'MISSED'}); "
              f"load average now {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
