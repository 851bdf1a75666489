"""The GPU recipe for the paper's GSM8K setting: it parses into a valid TrainConfig with the
reference values everywhere it runs, and trains for real where a GPU, vLLM and the model are."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "gsm8k-qwen2.5-0.5b.json"


def test_recipe_holds_the_reference_values():
    from llm.trainer import TrainConfig
    d = json.loads(RECIPE.read_text())["train"]
    d["device"] = "auto"  # this machine may have no GPU; the values are what is checked
    cfg = TrainConfig.from_dict(d)
    algo = cfg.algo()
    assert (algo.explore.G, algo.explore.K, algo.explore.gamma, algo.explore.n_pivots) == (8, 8, 2.0, 1)
    assert algo.loss.lam == 1.0 and algo.loss.kl_coef == 1e-4 and algo.loss.kl_estimator == "k3"
    assert cfg.lr == 1e-6 and cfg.max_grad_norm == 1.0 and cfg.prompts_per_step == 64
    assert cfg.sampling.temperature == 1.0 and cfg.sampling.max_response_tokens == 1024
    assert cfg.engine == "vllm" and cfg.task == "gsm8k"


def test_recipe_without_the_model_is_a_one_line_error(tmp_path):
    p = subprocess.run([sys.executable, "-m", "deepgrpo.cli", "llm", "train", "--config", str(RECIPE),
                        "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2
    assert "models/Qwen2.5-0.5B-Instruct" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(not os.environ.get("DEEPGRPO_GSM8K_DIR"),
                    reason="set DEEPGRPO_GSM8K_DIR to a directory with models/ and data/gsm8k/ as in the recipe")
def test_recipe_trains_two_steps_on_a_gpu(tmp_path):
    pytest.importorskip("vllm")
    root = Path(os.environ["DEEPGRPO_GSM8K_DIR"])
    p = subprocess.run([sys.executable, "-m", "deepgrpo.cli", "llm", "train", "--config", str(RECIPE),
                        "--steps", "2", "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=root)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "logprob_mismatch" in r]
    assert len(train_rows) >= 2 and all(abs(r["logprob_mismatch"]) < 0.05 for r in train_rows)
