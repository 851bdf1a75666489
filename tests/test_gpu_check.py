"""benchmarks/gpu_check.py (the GPU acceptance check), through its ``--cpu-dry-run``.

* With only the GPU machine's packages importable (torch, transformers, accelerate, numpy, scipy,
  pandas, matplotlib, seaborn, pyyaml, tqdm, safetensors and what they require, plus a trl wheel;
  gymnasium, datasets, math-verify and vLLM blocked), the dry run passes: our trainer and the
  branch cost PASS with finite figures and a computed zero-gradient check, and DeepGRPOTrainer
  is SKIPPED with the reason (trl cannot be imported without datasets).
* With trl and datasets present, the DeepGRPOTrainer item passes on a CPU.
* A failing, timed-out or skipped item is recorded as such, the others still run, and the exit
  code is 0 only if every item that was not skipped passed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"

GPU_MACHINE = ("torch", "transformers", "accelerate", "numpy", "scipy", "pandas", "matplotlib", "seaborn", "pyyaml",
               "tqdm", "safetensors")
"""What the GPU machine is known to have (their own requirements are installed with them)."""
WHEELS = ("trl",)
"""Small wheels that may be brought along: the package itself, not what it requires."""
NAMED = ("gymnasium", "datasets", "math_verify", "vllm")
"""Packages the GPU machine is known not to have; blocked by name (``sys.modules[name] = None``) too."""

WRAPPER = r"""
import atexit, json, runpy, sys
spec = json.loads(sys.argv[1])
blocked = frozenset(spec["blocked"])
for name in spec["named"]:
    sys.modules[name] = None  # "import name" raises ModuleNotFoundError


class Hidden:
    '''A meta-path finder that does not see the blocked top-level packages (as if not installed).'''

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            return None
        find = getattr(self.finder, "find_spec", None)
        return None if find is None else find(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.finder, attr)


sys.meta_path[:] = [Hidden(f) for f in sys.meta_path]


def dump():
    with open(spec["modules_file"], "w") as f:
        json.dump(sorted({m.partition(".")[0] for m, mod in list(sys.modules.items()) if mod is not None}), f)


atexit.register(dump)
sys.argv = spec["argv"]
runpy.run_path(spec["argv"][0], run_name="__main__")
"""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_closure(roots: tuple[str, ...]) -> set[str]:
    """Normalised names of the installed distributions ``roots`` and everything they require
    (without extras), from this environment's metadata."""
    from packaging.requirements import Requirement
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = _norm(todo.pop())
        if name in seen:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def blocked_modules() -> list[str]:
    """Top-level modules of every installed distribution outside the GPU machine's set, plus :data:`NAMED`."""
    allowed = requirement_closure(GPU_MACHINE) | {_norm(w) for w in WHEELS} | {"deepgrpo"}
    out = {top for top, dists in importlib.metadata.packages_distributions().items()
           if top not in sys.stdlib_module_names and not any(_norm(d) in allowed for d in dists)}
    return sorted(out | set(NAMED))


def run_dry(tmp_path: Path, *extra: str, blocked: list[str] | None = None, timeout: float = 240):
    """Run ``gpu_check.py --cpu-dry-run --out FILE`` in a fresh interpreter (optionally with modules
    blocked); returns (process, JSON summary, top-level modules imported, seconds)."""
    out = tmp_path / "summary.json"
    modules_file = tmp_path / "modules.json"
    argv = [str(SCRIPT), "--cpu-dry-run", "--out", str(out), "--workdir", str(tmp_path / "work"), *extra]
    if blocked is None:
        cmd = [sys.executable, *argv]
    else:
        spec = {"blocked": blocked, "named": list(NAMED), "modules_file": str(modules_file), "argv": argv}
        cmd = [sys.executable, "-c", WRAPPER, json.dumps(spec)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - t
    summary = json.loads(out.read_text()) if out.exists() else None
    modules = json.loads(modules_file.read_text()) if modules_file.exists() else None
    return proc, summary, modules, seconds


def assert_run_figures(run: dict, *, mismatch: bool) -> None:
    n = run["steps"]
    assert n == 2 and len(run["s_per_step"]) == n and len(run["loss"]) == n
    for key in ("s_per_step_mean", "gen_tokens_per_s_mean", "peak_mem_gb"):
        assert isinstance(run[key], float) and math.isfinite(run[key]) and run[key] > 0, key
    assert all(math.isfinite(x) and x > 0 for x in run["s_per_step"] + run["gen_tokens_per_s"])
    assert all(math.isfinite(x) for x in run["loss"])
    assert all(math.isfinite(x) and x > 0 for x in run["grad_norm"])
    assert sum(run["generated_tokens"]) == sum(run["tokens_main"]) + sum(run["tokens_aux"]) > 0
    if mismatch:  # float32 on a CPU: rollout and trainer log-probs agree to rounding
        assert all(0 <= x < 1e-4 for x in run["logprob_mismatch"] + run["logprob_mismatch_max"])
    else:
        assert run["logprob_mismatch"] is None and run["logprob_mismatch_note"]


def assert_zero_grad_computed(run: dict) -> None:
    z = run["aux_prefix_zero_grad"]
    assert z["computed"] and z["passed"]
    assert z["aux_rows_checked"] > 0 and z["prefix_tokens_checked"] >= z["aux_rows_checked"]
    assert z["max_abs_grad_on_prefix"] == 0.0 and z["max_abs_grad_on_padding"] == 0.0
    assert z["aux_rows_with_nonzero_suffix_grad"] == z["aux_rows_checked"]
    assert sum(run["rollouts_aux"]) > 0


@pytest.fixture(scope="module")
def gpu_machine_run(tmp_path_factory):
    """The dry run with only the GPU machine's packages (and a trl wheel) importable."""
    return run_dry(tmp_path_factory.mktemp("gpu-machine"), blocked=blocked_modules())


# the whole GPU check as a CPU dry run in a subprocess (about 15 s on 2 shared cores): slow tier,
# which CI runs; the script's sizes and parts are checked below in the default tier
@pytest.mark.slow
def test_dry_run_passes_with_the_gpu_machines_packages(gpu_machine_run):
    proc, summary, modules, seconds = gpu_machine_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert seconds < 60, seconds  # measured ~7 s on 2 shared cores
    assert summary["schema"] == "deepgrpo-gpu-check/1" and summary["mode"] == "cpu-dry-run"
    assert summary["status"] == "PASS" and summary["setup"]["status"] == "PASS"
    items = summary["items"]
    assert summary["order"] == ["trainer", "trl", "branch_cost"] == sorted(items, key=summary["order"].index)
    assert items["trainer"]["status"] == "PASS" and items["branch_cost"]["status"] == "PASS"
    trl = items["trl"]
    assert trl["status"] == "SKIPPED" and "datasets" in trl["reason"] and trl["error"] is None
    for name, item in items.items():
        assert item["wall_s"] >= 0 and item["cap_s"] > 0, name
        if item["status"] == "PASS":
            assert item["checks"] and all(item["checks"].values()), name
    # nothing the GPU machine lacks was imported, and the printed JSON is the written one
    assert not set(NAMED) & set(modules) and not set(NAMED) & set(summary["optional_modules_imported"])
    assert json.loads(proc.stdout) == summary
    assert summary["packages"]["datasets"]["found"] is False


@pytest.mark.slow
def test_dry_run_figures_are_finite_and_the_zero_gradient_check_ran(gpu_machine_run):
    _, summary, _, _ = gpu_machine_run
    runs = summary["items"]["trainer"]["runs"]
    assert set(runs) == {"grpo", "deep-grpo"}
    for run in runs.values():
        assert_run_figures(run, mismatch=True)
    assert sum(runs["grpo"]["rollouts_aux"]) == 0 and "aux_prefix_zero_grad" not in runs["grpo"]
    assert_zero_grad_computed(runs["deep-grpo"])
    bc = summary["items"]["branch_cost"]
    assert [d["depth"] for d in bc["depths"]] == [0.25, 0.5, 0.75]
    for d in bc["depths"]:
        assert abs(d["suffix_fraction"] - (1 - d["depth"])) < 1e-9
        for key in ("ratio_wall", "ratio_cpu", "ratio_over_suffix_wall", "root_tokens_per_s"):
            assert math.isfinite(d[key]) and d[key] > 0, key
    assert len(bc["repetitions"]) == 3 * summary["sizes"]["branch_reps"]
    sizes = summary["sizes"]
    assert sizes["model_shape"] == "micro" and sizes["G"] > 0 and sizes["K"] > 0
    assert sizes["max_response_tokens"] > 0 and sizes["prompts_per_step"] > 0


def test_gpu_sizes_are_qwen25_05b_and_fit_the_budget():
    gc = load_script()
    s = gc.GPU_SIZES
    assert s.model["hidden_size"] == 896 and s.model["num_hidden_layers"] == 24 and s.model["vocab_size"] == 151936
    assert s.model["num_attention_heads"] == 14 and s.model["num_key_value_heads"] == 2
    assert s.G == s.K == 8 and s.prompts_per_step == 4 and 128 <= s.max_response_tokens <= 256
    assert s.depths == (0.25, 0.5, 0.75)
    assert sum(s.caps.values()) <= s.time_budget_s <= 8 * 60 - 20  # room for imports and the JSON
    assert (s.prompts_per_step * s.G) % s.trl_grad_accum == 0
    assert (s.prompts_per_step * s.G // s.trl_grad_accum * s.trl_grad_accum) % s.G == 0


@pytest.mark.slow  # the TRL item's dry run (the trainer itself is in the default tier: test_trl_trainer.py)
@pytest.mark.skipif(importlib.util.find_spec("trl") is None or importlib.util.find_spec("datasets") is None,
                    reason="needs trl and datasets (pip install -e '.[llm,trl]')")
def test_deep_grpo_trainer_item_passes_on_a_cpu(tmp_path):
    proc, summary, _, _ = run_dry(tmp_path, "--items", "trl")
    assert proc.returncode == 0, proc.stderr[-3000:]
    item = summary["items"]["trl"]
    assert summary["order"] == ["trl"] == list(summary["items"]) and item["status"] == "PASS", item
    run = item["runs"]["deep-grpo"]
    assert_run_figures(run, mismatch=False)
    assert_zero_grad_computed(run)


# -- the runner, in process ------------------------------------------------------------------------------

def load_script():
    """benchmarks/gpu_check.py as a module (benchmarks/ is not a package); a fresh copy per call."""
    name = "gpu_check_under_test"
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_failures_timeouts_and_skips_are_recorded_one_per_item(tmp_path):
    gc = load_script()
    ctx = gc.Context(dry_run=True, sizes=gc.DRY_SIZES, workdir=tmp_path, seed=0)

    def boom(ctx):
        raise ValueError("bad value\nsecond line")

    def slow(ctx):
        time.sleep(5)
        return {"checks": {"ok": True}}

    def skip(ctx):
        raise gc.Skip("no such package")

    r = gc.run_item("x", boom, ctx, 30)
    assert r["status"] == "FAIL" and r["error"] == "ValueError: bad value" and "Traceback" in r["traceback"]
    t = time.perf_counter()
    r = gc.run_item("x", slow, ctx, 0.3)
    assert time.perf_counter() - t < 3
    assert r["status"] == "FAIL" and r["error"].startswith("ItemTimeout: time cap of 0.3 s")
    r = gc.run_item("x", skip, ctx, 30)
    assert r["status"] == "SKIPPED" and r["reason"] == "no such package" and r["error"] is None
    r = gc.run_item("x", lambda ctx: {"checks": {"a": True, "b": False}, "value": 1.0}, ctx, 30)
    assert r["status"] == "FAIL" and r["error"] == "checks failed: b" and r["value"] == 1.0
    r = gc.run_item("x", lambda ctx: {"checks": {"a": True}}, ctx, 30)
    assert r["status"] == "PASS" and r["error"] is None
    ctx.setup_error = "RuntimeError: no CUDA device"
    r = gc.run_item("x", lambda ctx: {"checks": {"a": True}}, ctx, 30)
    assert r["status"] == "FAIL" and "setup failed: RuntimeError: no CUDA device" in r["error"]


def test_exit_code_is_zero_only_if_every_item_that_ran_passed(tmp_path, monkeypatch, capsys):
    gc = load_script()

    def fake_setup(ctx, cap):
        import torch
        ctx.device = torch.device("cpu")
        ctx.model_dir = tmp_path / "model"
        return {"status": "PASS", "cap_s": cap, "error": None, "traceback": None, "wall_s": 0.0}

    def fail(ctx):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def skip(ctx):
        raise gc.Skip("trl is not installed")

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "TRL_EXPERIMENTAL_SILENCE",
                "TOKENIZERS_PARALLELISM"):  # main() sets them if unset: keep them out of other tests
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(gc, "quiet_transformers", lambda: None)
    monkeypatch.setattr(gc, "setup", fake_setup)
    out = tmp_path / "a" / "summary.json"
    seen = {}

    def last(ctx):  # the results so far are on disk while later items run
        seen.update(json.loads(out.read_text()))
        return {"checks": {"ok": True}}

    monkeypatch.setattr(gc, "ITEM_FUNCTIONS", {"trainer": fail, "trl": skip, "branch_cost": last})
    assert gc.main(["--cpu-dry-run", "--out", str(out), "--workdir", str(tmp_path / "w")]) == 1
    summary = json.loads(out.read_text())
    assert summary["status"] == "FAIL"
    assert [summary["items"][k]["status"] for k in ("trainer", "trl", "branch_cost")] == ["FAIL", "SKIPPED", "PASS"]
    assert summary["items"]["trainer"]["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert seen["status"] == "INCOMPLETE" and sorted(seen["items"]) == ["trainer", "trl"]
    assert not list(out.parent.glob(".*.tmp"))  # written atomically: no temporary file left behind
    capsys.readouterr()
    assert gc.main(["--cpu-dry-run", "--items", "trl,branch_cost", "--workdir", str(tmp_path / "w")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["status"] == "PASS" and printed["order"] == ["trl", "branch_cost"]
    assert sorted(printed["items"]) == ["branch_cost", "trl"]
    with pytest.raises(SystemExit) as e:
        gc.main(["--cpu-dry-run", "--items", "trainer,gpu"])
    assert e.value.code == 2


def test_trl_absent_or_missing_a_dependency_is_a_skip_with_the_reason(monkeypatch):
    gc = load_script()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    with pytest.raises(gc.Skip, match="trl is not installed"):
        gc.import_trl_trainer()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))
    err = RuntimeError("Failed to import trl.trainer.grpo_trainer")
    err.__cause__ = ModuleNotFoundError("No module named 'datasets'", name="datasets")
    assert gc.missing_module(err) == "datasets"
    assert gc.missing_module(RuntimeError("CUDA out of memory")) is None
    assert gc.missing_module(ModuleNotFoundError("No module named 'llm.x'", name="llm.x")) is None


def test_prefix_gradient_probe_sees_a_gradient_on_a_prefix():
    import torch

    from deepgrpo.batch import AUX, MAIN
    gc = load_script()
    stream, prefix_len = torch.tensor([MAIN, AUX]), torch.tensor([0, 2])
    mask = torch.tensor([[True] * 5, [True] * 4 + [False]])
    for leak, passed in ((0.0, True), (1e-3, False)):
        probe = gc.PrefixGradProbe()
        lp = torch.zeros(2, 5, requires_grad=True)
        probe.watch(lp, stream, prefix_len, mask)
        weight = mask.float()
        weight[1, :2] = leak  # the aux row's prefix: no gradient unless it leaks
        (lp * weight).sum().backward()
        z = probe.summary()
        assert z["computed"] and z["aux_rows_checked"] == 1 and z["prefix_tokens_checked"] == 2
        assert z["passed"] is passed and z["max_abs_grad_on_prefix"] == pytest.approx(leak)
    probe = gc.PrefixGradProbe()
    probe.watch(torch.zeros(2, 5), stream, prefix_len, mask)  # no gradient: nothing recorded
    assert probe.summary()["computed"] is False and probe.summary()["passed"] is False
