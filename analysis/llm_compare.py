"""``deepgrpo study llm-compare``: methods on a real LM at equal *generated tokens*.

Every method trains from the same SFT start until the same total of generated tokens (main +
aux; :attr:`llm.trainer.TrainConfig.budget`), so cheaper methods take more steps; each (method,
seed) pair is one run directory under ``OUT/runs``. Runs already finished are skipped and
unfinished ones resumed from their checkpoint, so the command can be interrupted and rerun.
A rerun must use the same settings: they are recorded in ``OUT/settings.json`` (and each run's
in its ``config.json``), and a change other than ``--threads`` is refused in one line rather
than resuming runs under settings they did not start with. One process trains a run at a time
(each run directory is locked while it is trained; ``--shard`` splits the runs between
processes). The outputs, in ``OUT``:

- ``report/``: the curves of every run against rollouts and tokens
  (:func:`analysis.llm_runs.write_llm_report`);
- ``final.csv``: one row per run: held-out greedy and sampled accuracy and pass@k before and
  after, steps, rollouts and tokens spent, and the settings the run used (read from its own
  ``config.json``: learning rate, warm-up, budget, prompts per step, evaluation sizes);
- ``comparison.csv``: per method, the mean final value and its 95 % interval over seeds, and
  the paired difference to every GRPO-N (same seeds: same data order and evaluation set);
- ``COMPARISON.md``: the table the README shows, with its budget unit and the settings the
  runs used (from their ``config.json``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from deepgrpo.config import ConfigError, check_range
from deepgrpo.flags import OptionSet, load_config_file
from deepgrpo.records import write_csv_atomic, write_text_atomic

DEFAULT_METHODS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("GRPO N=8", "grpo", {"G": 8}),
    ("GRPO N=16", "grpo", {"G": 16}),
    ("GRPO N=32", "grpo", {"G": 32}),
    ("root-only (G=8, K=8)", "root-only", {}),
    ("DEEP-GRPO position P̂", "deep-grpo", {}),
    ("DEEP-GRPO state P̂", "deep-state", {}),
)
"""(label, method, overrides) compared by default: GRPO at three group sizes, the paper's
root-only ablation and DEEP-GRPO with the position-only and the state-aware estimator."""


def metrics(cfg: LLMCompareConfig) -> tuple[str, str, str]:
    """Held-out metrics compared (the trainer's ``eval/`` columns): greedy and sampled mean@1
    and pass@k with k = ``eval_samples``."""
    return ("greedy_mean@1", "sampled_mean@1", f"pass@{cfg.eval_samples}")


@dataclass
class LLMCompareConfig:
    """An equal-budget comparison of methods on a local causal LM.

    model: the SFT start every run begins from (``deepgrpo llm sft`` output).
    budget: total generated tokens (main + aux) each run spends (it stops at the first step
        boundary past it).
    seeds: training seeds 0..seeds-1 (data order and sampling; the held-out set is the same).
    prompts_per_step: prompts per step (paper: 64).
    lr: AdamW learning rate (one for every method).
    lr_warmup_steps: its linear warm-up.
    eval_problems: held-out problems.
    eval_samples: sampled responses per problem (pass@k with k = eval_samples).
    threads: torch CPU threads.
    steps_cap: the most steps any run may take (a safety cap; the budget binds first).
    methods: (label, method, overrides) compared (default :data:`DEFAULT_METHODS`).
    """

    model: str
    budget: int = 600_000
    seeds: int = 3
    prompts_per_step: int = 64
    lr: float = 1e-4
    lr_warmup_steps: int = 5
    eval_problems: int = 512
    eval_samples: int = 4
    threads: int = 2
    steps_cap: int = 1000
    methods: list[tuple[str, str, dict[str, Any]]] = field(default_factory=lambda: list(DEFAULT_METHODS))

    def __post_init__(self) -> None:
        o = type(self).__name__
        check_range(o, "budget", self.budget, 1, None, integer=True)
        check_range(o, "seeds", self.seeds, 1, None, integer=True)
        check_range(o, "prompts_per_step", self.prompts_per_step, 1, None, integer=True)
        check_range(o, "lr", self.lr, 0.0, None, lo_open=True)
        check_range(o, "eval_problems", self.eval_problems, 1, None, integer=True)
        check_range(o, "eval_samples", self.eval_samples, 1, None, integer=True)
        check_range(o, "threads", self.threads, 1, None, integer=True)


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-").replace("--", "-")


def run_dir(out: str | Path, label: str, seed: int) -> Path:
    """The run directory of (method label, seed) under ``out``."""
    return Path(out) / "runs" / f"{_slug(label)}-s{seed}"


SETTINGS_FILE = "settings.json"
"""The comparison's settings, recorded in its output directory when it starts."""
RESUMABLE_CHANGES = ("threads",)
"""Settings a rerun may change (they do not change what a run computes)."""
RUN_SETTINGS = ("model", "method", "overrides", "prompts_per_step", "steps", "budget", "budget_unit", "lr",
                "lr_warmup_steps", "seed")
"""The fields of a run's :class:`~llm.trainer.TrainConfig` the comparison sets (besides the
evaluation sizes), compared with the run's ``config.json`` on a rerun."""


def _plain(x: Any) -> Any:
    """``x`` as JSON would give it back (tuples as lists), for comparing with a recorded value."""
    from deepgrpo.records import json_line
    return json.loads(json_line(x))


def _flag(field_name: str) -> str:
    """The flag of an :class:`LLMCompareConfig` field (``--lr``, ``--steps`` for ``steps_cap``)."""
    from deepgrpo.flags import flag_name
    return "the methods compared (--quick or --set methods)" if field_name == "methods" else \
        "--" + flag_name("LLMCompareConfig", field_name)


def check_settings(cfg: LLMCompareConfig, out: str | Path) -> None:
    """Refuse to continue the comparison in ``out`` under other settings than it started with
    (:data:`SETTINGS_FILE`, and for directories made before that file, each existing run's
    ``config.json``): a :class:`ConfigError` naming the option, its recorded and its new value.
    Only :data:`RESUMABLE_CHANGES` may change. Then record the settings."""
    from deepgrpo.records import write_json_atomic
    out = Path(out)
    now = _plain({**dataclasses.asdict(cfg), "model": str(Path(cfg.model).resolve())})
    path = out / SETTINGS_FILE
    if path.is_file():
        try:
            before = json.loads(path.read_text())["compare"]
            if not isinstance(before, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"--out = {str(out)!r} is invalid: {str(path)!r} is damaged ({type(e).__name__}); "
                              "restore it or choose another --out", owner="--out", value=str(out)) from None
        for name, value in now.items():
            if name not in RESUMABLE_CHANGES and before.get(name) != value:
                raise ConfigError(
                    f"{_flag(name)} = {value!r} is invalid: the comparison in {str(out)!r} was started with "
                    f"{name} = {before.get(name)!r} ({SETTINGS_FILE}); rerun with its settings to resume it, or choose "
                    f"another --out (only {', '.join('--' + c for c in RESUMABLE_CHANGES)} may change)",
                    owner="--out", field=name, value=value)
    for label, seed, tc in run_configs(cfg):  # runs of a directory made before settings.json
        record = run_dir(out, label, seed) / "config.json"
        if not record.is_file():
            continue
        try:
            used = json.loads(record.read_text())["train"]
        except (ValueError, KeyError, TypeError):
            continue  # the trainer reports a damaged run record itself
        planned = _plain(tc.to_dict())
        pairs = [(k, used.get(k), planned[k]) for k in RUN_SETTINGS]
        pairs += [(f"eval.{k}", (used.get("eval") or {}).get(k), planned["eval"][k]) for k in ("n_problems", "samples")]
        for name, was, will in pairs:
            if was != will:
                raise ConfigError(f"--out = {str(out)!r} is invalid: run {str(record.parent)!r} was started with "
                                  f"{name} = {was!r}, these settings would resume it with {will!r}; rerun with the "
                                  "settings it started with, or choose another --out", owner="--out", value=str(out))
    write_json_atomic(path, {"kind": "llm-compare", "compare": now})


def run_configs(cfg: LLMCompareConfig) -> list[tuple[str, int, Any]]:
    """``(label, seed, TrainConfig)`` of every run of the comparison."""
    from llm.evaluate import EvalConfig
    from llm.trainer import TrainConfig
    out = []
    for label, method, overrides in cfg.methods:
        for seed in range(cfg.seeds):
            out.append((label, seed, TrainConfig(
                model=str(Path(cfg.model).resolve()), method=method, overrides=dict(overrides),
                prompts_per_step=cfg.prompts_per_step, steps=cfg.steps_cap, budget=cfg.budget, budget_unit="tokens",
                lr=cfg.lr, lr_warmup_steps=cfg.lr_warmup_steps, eval_every=0, checkpoint_every=5,
                eval=EvalConfig(n_problems=cfg.eval_problems, samples=cfg.eval_samples), seed=seed,
                threads=cfg.threads, tensorboard=False)))
    return out


def run_all(cfg: LLMCompareConfig, out: str | Path, progress: bool = True, shard: tuple[int, int] = (0, 1)
            ) -> list[Path]:
    """Train every run not finished yet (resuming interrupted ones); returns every run directory.
    ``shard = (i, n)`` trains only runs i, i + n, i + 2n, ... (n processes share the work)."""
    from deepgrpo.records import lock_output
    from llm.checkpoint import has_checkpoint, recover_interrupted
    from llm.models import check_model_dir
    from llm.trainer import Trainer
    check_model_dir(cfg.model, "--model")
    runs = run_configs(cfg)
    dirs = [run_dir(out, label, seed) for label, seed, _ in runs]
    mine = [i for i, d in enumerate(dirs) if i % shard[1] == shard[0] and not (d / "summary.json").is_file()]
    for k, index in enumerate(mine, 1):
        (label, seed, tc), d = runs[index], dirs[index]
        lock_output(d, "--out")  # one process per run, held until the command ends
        if (d / "summary.json").is_file():  # finished by the process that held it
            continue
        t0 = time.time()
        recover_interrupted(d / "checkpoint")  # a save cut short between its renames: put the checkpoint back
        resume = has_checkpoint(d / "checkpoint")
        if progress:  # each run then shows its own bars (evaluations and training)
            print(f"llm-compare: training run {k} of {len(mine)} here: {label} seed {seed}"
                  + (" (resumed)" if resume else ""), flush=True)
        Trainer(tc, d, resume=resume, progress=progress).run()
        print(f"llm-compare: {label} seed {seed} done in {time.time() - t0:.0f} s -> {d}", flush=True)
    return dirs


USED_SETTINGS = (("lr", ("lr",)), ("lr_warmup_steps", ("lr_warmup_steps",)), ("budget", ("budget",)),
                 ("budget_unit", ("budget_unit",)), ("prompts_per_step", ("prompts_per_step",)),
                 ("eval_problems", ("eval", "n_problems")), ("eval_samples", ("eval", "samples")))
"""``final.csv`` columns of the settings a run used, and where its ``config.json`` (``train``) holds them."""


def used_settings(d: Path) -> dict[str, Any]:
    """The settings run directory ``d`` was trained with (:data:`USED_SETTINGS`), from its own
    ``config.json``; a value it does not record is None."""
    try:
        train = json.loads((d / "config.json").read_text())["train"]
    except (OSError, ValueError, KeyError, TypeError):
        train = {}
    out = {}
    for column, path in USED_SETTINGS:
        value: Any = train
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        out[column] = value
    return out


def final_table(cfg: LLMCompareConfig, dirs: Sequence[Path]) -> pd.DataFrame:
    """One row per run: label, method, seed, held-out metrics before/after, budget spent, and
    the settings the run used (:func:`used_settings`)."""
    rows = []
    for (label, seed, tc), d in zip(run_configs(cfg), dirs):
        s = json.loads((d / "summary.json").read_text())
        row = {"label": label, "method": tc.method, "seed": seed, "steps": s["steps"],
               "rollouts": s["budget"]["rollouts"], "tokens": s["budget"]["tokens"], **used_settings(d)}
        for m in metrics(cfg):
            row[f"{m}_before"] = s["before"].get(m, np.nan)
            row[f"{m}_after"] = s["after"].get(m, np.nan)
        rows.append(row)
    return pd.DataFrame(rows)


def comparison_table(final: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """Per label: mean final metric with a 95 % t-interval over seeds, and the paired difference
    (same seeds) to each GRPO-N label, with its interval."""
    from analysis.stats import mean_ci
    labels = list(dict.fromkeys(final["label"]))
    grpo = [lab for lab in labels if final.loc[final.label == lab, "method"].iloc[0] == "grpo"]
    out = []
    for lab in labels:
        f = final[final.label == lab].set_index("seed").sort_index()
        row: dict[str, Any] = {"label": lab, "seeds": len(f), "steps": f["steps"].mean(),
                               "rollouts": f["rollouts"].mean(), "tokens": f["tokens"].mean()}
        for m in names:
            e = mean_ci(100 * f[f"{m}_after"].to_numpy())
            row[m], row[f"{m}_pm"] = e.mean, e.half_width
            for g in grpo:
                if g == lab:
                    continue
                ref = final[final.label == g].set_index("seed").sort_index()
                seeds = f.index.intersection(ref.index)
                d = mean_ci(100 * (f.loc[seeds, f"{m}_after"] - ref.loc[seeds, f"{m}_after"]).to_numpy())
                row[f"{m} - {g}"], row[f"{m} - {g}_pm"] = d.mean, d.half_width
        out.append(row)
    return pd.DataFrame(out)


def _used(final: pd.DataFrame, column: str, fmt: str = "") -> str:
    """The value of setting ``column`` that the runs of ``final`` used, in words: one value, or
    each value with the runs that used it (``1e-04 (GRPO N=8 s0, s1); 2e-04 (...)``)."""
    if column not in final:
        return "unknown"
    values = final[column].astype(object).where(final[column].notna(), None)

    def text(v: Any) -> str:
        return "unknown" if v is None else format(v, fmt) if fmt else str(v)

    kinds = list(dict.fromkeys(text(v) for v in values))
    if len(kinds) == 1:
        return kinds[0]
    by = {k: [f"{r.label} s{r.seed}" for r, v in zip(final.itertuples(), values) if text(v) == k] for k in kinds}
    return "; ".join(f"{k} ({', '.join(runs)})" for k, runs in by.items())


def comparison_markdown(cfg: LLMCompareConfig, final: pd.DataFrame, comp: pd.DataFrame) -> str:
    """The README's table: final held-out metrics (points) at the common token budget. The
    settings it states are those the runs used (``final``'s columns, from each run's
    ``config.json``), which differ from ``cfg`` only if the runs were made under other ones."""
    start = final.iloc[0]
    g, smp, pk = metrics(cfg)
    seeds = int(final.groupby("label").seed.nunique().max()) if len(final) else 0
    budget = _used(final, "budget", ",")
    unit = _used(final, "budget_unit")
    spent = "generated " + budget + " tokens" if unit == "tokens" else f"spent {budget} {unit}"
    lines = [f"Equal budget: every run {spent} (main + aux; it stops at the first step "
             f"past it). {seeds} training seeds, {_used(final, 'prompts_per_step')} prompts/step, AdamW lr "
             f"{_used(final, 'lr', 'g')} ({_used(final, 'lr_warmup_steps')}-step warm-up); "
             f"{_used(final, 'eval_problems')} held-out problems, {_used(final, 'eval_samples')} "
             f"samples each at T = 1. Start (SFT): greedy {100 * start[f'{g}_before']:.1f}, sampled "
             f"{100 * start[f'{smp}_before']:.1f}, {pk} {100 * start[f'{pk}_before']:.1f}. Mean ± 95 % "
             "t-interval over seeds, in points; Δ is the paired difference to GRPO N=8.", "",
             f"| method | steps | rollouts | tokens | greedy | sampled | {pk} | Δ sampled vs N=8 | Δ {pk} vs N=8 |",
             "|---|---|---|---|---|---|---|---|---|"]
    def cell(r: pd.Series, key: str) -> str:
        v, pm = r.get(key, np.nan), r.get(f"{key}_pm", np.nan)
        if not np.isfinite(v):
            return "—"
        pm_text = f" ± {pm:.1f}" if np.isfinite(pm) else ""
        return f"{v:+.1f}{pm_text}" if " - " in key else f"{v:.1f}{pm_text}"

    for _, r in comp.iterrows():
        lines.append(f"| {r['label']} | {r['steps']:.0f} | {r['rollouts']:,.0f} | {r['tokens']:,.0f} | "
                     f"{cell(r, g)} | {cell(r, smp)} | {cell(r, pk)} | "
                     f"{cell(r, f'{smp} - GRPO N=8')} | {cell(r, f'{pk} - GRPO N=8')} |")
    return "\n".join(lines) + "\n"


def write_comparison(cfg: LLMCompareConfig, out: str | Path, dirs: Sequence[Path]) -> Path:
    """``final.csv``, ``comparison.csv``, ``COMPARISON.md`` and the curves in ``report/``."""
    from analysis.llm_runs import write_llm_report
    out = Path(out)
    final = final_table(cfg, dirs)
    comp = comparison_table(final, metrics(cfg))
    write_csv_atomic(out / "final.csv", final)
    write_csv_atomic(out / "comparison.csv", comp)
    write_llm_report(dirs, out / "report")
    return write_text_atomic(out / "COMPARISON.md", comparison_markdown(cfg, final, comp))


@dataclass
class LLMCompareSettings:
    """Everything ``deepgrpo study llm-compare`` can set.

    compare: the comparison (model, budget, seeds, loop, evaluation).
    """

    compare: LLMCompareConfig = field(default_factory=lambda: LLMCompareConfig(model=""))


OPTIONS = OptionSet(LLMCompareSettings, reserved=("out", "quick", "shard", "config", "set", "help"),
                    hidden=("compare.methods",))


DESCRIPTION = ("Methods on a real LM at equal generated tokens: every method trains from the same SFT start "
               "until the same total of generated tokens (cheaper methods take more steps); resumable, and a rerun "
               "must use the same settings.")
"""What ``deepgrpo study llm-compare`` does, for its ``--help``."""


def add_arguments(p: Any) -> None:
    """The options of ``deepgrpo study llm-compare`` (on parser ``p``)."""
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--quick", action="store_true", help="two methods, one seed, a tiny budget (tests)")
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="train only runs I, I+N, ... (N processes share the runs); the tables are written by "
                        "the process that finds every run finished")
    OPTIONS.add_arguments(p)


def main(argv: Sequence[str] | None = None, prog: str = "deepgrpo study llm-compare") -> int:
    """``deepgrpo study llm-compare --model SFT_DIR --out DIR [--budget N --seeds S ...]``."""
    from deepgrpo.flags import OneLineParser
    from deepgrpo.records import check_writable_dir
    p = OneLineParser(prog=prog, description=DESCRIPTION)
    add_arguments(p)
    try:
        a = p.parse_args(argv)
        quick = {"budget": 3000, "seeds": 1, "prompts_per_step": 4, "eval_problems": 8, "eval_samples": 2,
                 "methods": [DEFAULT_METHODS[0], DEFAULT_METHODS[4]]} if a.quick else {}
        base = LLMCompareSettings(compare=dataclasses.replace(LLMCompareConfig(model=""), **quick))
        file_layer = OPTIONS.file_values(load_config_file(a.config))[0] if a.config else {}
        cfg = OPTIONS.build(base, file_layer, OPTIONS.flag_values(a), OPTIONS.set_values(a.set)).compare
        if not cfg.model:
            raise ConfigError("--model is required: the SFT start of every run", owner="--model")
        i, _, n = a.shard.partition("/")
        if not (i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
            raise ConfigError(f"--shard = {a.shard!r} is invalid: expected I/N with 0 <= I < N", owner="--shard")
        from llm.models import check_model_dir
        check_model_dir(cfg.model, "--model")
        check_writable_dir(a.out, "--out")
        check_settings(cfg, a.out)
        dirs = run_all(cfg, a.out, shard=(int(i), int(n)))
        if not all((d / "summary.json").is_file() for d in dirs):
            print(f"llm-compare: shard {a.shard} done; the tables are written once every run is finished")
            return 0
        path = write_comparison(cfg, a.out, dirs)
    except ConfigError as e:
        option = OPTIONS.option_of(e)
        where = f"{option}: " if option and not str(e).startswith(option) else ""
        print(f"{prog}: error: {where}{e}", file=sys.stderr)
        return 2
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
