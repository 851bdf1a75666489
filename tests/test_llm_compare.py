"""The equal-token LLM comparison (analysis/llm_compare.py) at a tiny budget on a micro model:
every run stops at the same token budget, the tables agree with the runs' own records, and the
paired differences are the differences of the per-seed values."""

import json

import numpy as np
import pandas as pd
import pytest


@pytest.fixture(scope="module")
def micro_dir(tmp_path_factory):
    from llm.models import save_pretrained_dir
    from llm.testing import micro_model
    model, tok = micro_model(seed=0)
    return save_pretrained_dir(model, tok, tmp_path_factory.mktemp("micro") / "model")


@pytest.mark.slow
def test_equal_token_comparison_tables(micro_dir, tmp_path):
    from analysis.llm_compare import DEFAULT_METHODS, LLMCompareConfig, run_all, write_comparison
    cfg = LLMCompareConfig(model=str(micro_dir), budget=1500, seeds=2, prompts_per_step=2, eval_problems=4,
                           eval_samples=2, threads=1, methods=[DEFAULT_METHODS[0], DEFAULT_METHODS[4]])
    dirs = run_all(cfg, tmp_path, progress=False)
    write_comparison(cfg, tmp_path, dirs)
    final = pd.read_csv(tmp_path / "final.csv")
    assert len(final) == 4 and set(final["label"]) == {"GRPO N=8", "DEEP-GRPO position P̂"}
    for d, (_, r) in zip(dirs, final.iterrows()):
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        spent_before_last = rows[-2]["tokens"] if len(rows) > 2 else 0
        assert spent_before_last < cfg.budget <= rows[-1]["tokens"] == r["tokens"]  # within one step
        assert r["sampled_mean@1_after"] == rows[-1]["eval/sampled_mean@1"]
    comp = pd.read_csv(tmp_path / "comparison.csv").set_index("label")
    deep = final[final.label == "DEEP-GRPO position P̂"].set_index("seed")["pass@2_after"]
    grpo = final[final.label == "GRPO N=8"].set_index("seed")["pass@2_after"]
    assert comp.loc["DEEP-GRPO position P̂", "pass@2 - GRPO N=8"] == pytest.approx(100 * float(np.mean(deep - grpo)))
    md = (tmp_path / "COMPARISON.md").read_text()
    assert "1,500 tokens" in md and "| GRPO N=8 |" in md
    assert (tmp_path / "report" / "at_budget.csv").is_file()
    # a rerun finds every run finished and trains nothing
    assert run_all(cfg, tmp_path, progress=False) == dirs


def test_the_readme_command_states_the_settings_of_the_readme_table(micro_dir, tmp_path, capsys):
    """The README's `study llm-compare` command resolves to the settings the committed table
    (docs/reports/llm-compare-400k/COMPARISON.md, which the README shows) was made with. The
    command is run as a shard that trains none of the 18 runs: it resolves and records its
    settings (settings.json) and stops."""
    import re
    import shlex
    from pathlib import Path

    from analysis.llm_compare import DEFAULT_METHODS, main
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    commands = re.findall(r"`(deepgrpo study llm-compare [^`]*)`", readme)
    assert len(commands) == 1, commands
    args = shlex.split(commands[0])[3:]
    args[args.index("--model") + 1] = str(micro_dir)
    args[args.index("--out") + 1] = str(tmp_path / "cmp")
    runs = len(DEFAULT_METHODS) * 3
    assert main([*args, "--shard", f"{runs + 1}/{runs + 2}"]) == 0
    assert "shard" in capsys.readouterr().out
    used = json.loads((tmp_path / "cmp" / "settings.json").read_text())["compare"]
    record = (root / "docs" / "reports" / "llm-compare-400k" / "COMPARISON.md").read_text().splitlines()[0]
    stated = re.search(r"every run generated ([\d,]+) tokens .* (\d+) training seeds, (\d+) prompts/step, AdamW lr "
                       r"([\d.e-]+) \((\d+)-step warm-up\); (\d+) held-out problems, (\d+) samples each", record)
    assert stated, record
    budget, seeds, prompts, lr, warmup, problems, samples = stated.groups()
    assert (used["budget"], used["seeds"], used["prompts_per_step"], used["lr"], used["lr_warmup_steps"],
            used["eval_problems"], used["eval_samples"]) == \
        (int(budget.replace(",", "")), int(seeds), int(prompts), float(lr), int(warmup), int(problems), int(samples))
    assert [m[0] for m in used["methods"]] == [m[0] for m in DEFAULT_METHODS]  # the table's rows
    assert "400,000 generated tokens" in readme and "256 held-out problems" in readme  # the README's own words
