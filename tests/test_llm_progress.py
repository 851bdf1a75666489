"""Long LLM phases show progress (evaluations, budget-bound training, the studies' sampling) without
changing a number: the HF engine reports rows as they end, and a bar counts them."""

from __future__ import annotations

import re

import pytest
import torch

from llm.tasks import DATA_DIR, load_problems


@pytest.fixture(scope="module")
def micro(one_torch_thread, tmp_path_factory):
    from llm.testing import save_micro_model
    return save_micro_model(tmp_path_factory.mktemp("micro") / "model", load_problems(DATA_DIR / "arith_sample.jsonl"),
                            steps=40)


def test_engine_reports_rows_as_they_end_and_samples_the_same():
    """Rows capped at 2, 5 and 9 tokens (no stop token) end at decoding steps 2, 5 and 9: three
    reports of one row each; the tokens are those of the same call without a hook."""
    from llm.engine import reporting_rows
    from llm.hf_engine import HFEngine
    from llm.testing import micro_model
    model, tok = micro_model()
    engine = HFEngine(model, [tok.eos_token_id], tok.pad_token_id, prune_fraction=0.3)
    kw = dict(max_new_tokens=[2, 5, 9], stop_token_ids=[], temperature=1.0, seed=3)
    plain = engine.generate([[1, 5], [1, 6, 7], [1, 8]], 1, **kw)
    seen: list[int] = []
    with reporting_rows(engine, seen.append) as live:
        hooked = engine.generate([[1, 5], [1, 6, 7], [1, 8]], 1, **kw)
    assert live and seen == [1, 1, 1] and engine.row_progress is None
    assert [g.token_ids for g in hooked] == [g.token_ids for g in plain]
    assert [len(g.token_ids) for g in plain] == [2, 5, 9]
    # two rows of one request with nothing to generate are reported once the call ends
    seen.clear()
    with reporting_rows(engine, seen.append):
        assert engine.generate([[1, 5]], 2, max_new_tokens=0) != []
    assert seen == [2]
    # an engine without the hook: the caller counts the rows itself
    with reporting_rows(object(), seen.append) as live:
        assert not live


def test_evaluation_counts_every_response_and_gives_the_same_numbers(micro, capsys):
    from llm.evaluate import EvalConfig, evaluate
    from llm.hf_engine import HFEngine
    from llm.models import load_causal_lm, load_tokenizer
    from llm.tasks import make_prompts
    tok = load_tokenizer(micro)
    engine = HFEngine(load_causal_lm(micro, trainable=False), [tok.eos_token_id], tok.pad_token_id)
    prompts = make_prompts(load_problems(DATA_DIR / "arith_sample.jsonl"), tok)
    cfg = EvalConfig(n_problems=6, samples=3, max_response_tokens=40)
    capsys.readouterr()
    quiet = evaluate(engine, tok, prompts, cfg)
    assert capsys.readouterr().err == ""
    shown = evaluate(engine, tok, prompts, cfg, progress=True, desc="held-out evaluation of x")
    err = capsys.readouterr().err
    assert shown == quiet
    assert "held-out evaluation of x" in err and "24/24" in err  # 6 greedy + 6 x 3 sampled responses


def test_training_shows_its_evaluations_and_the_budget_it_spent(micro, tmp_path, capsys):
    from llm.backend import SamplingConfig
    from llm.evaluate import EvalConfig
    from llm.trainer import TrainConfig, Trainer
    cfg = TrainConfig(model=str(micro), data=None, eval_data=str(DATA_DIR / "arith_sample.jsonl"), method="grpo",
                      overrides={"G": 4}, prompts_per_step=2, steps=50, budget=40, budget_unit="rollouts",
                      sampling=SamplingConfig(max_response_tokens=24), eval=EvalConfig(n_problems=3, samples=2),
                      threads=1, tensorboard=False, seed=0)
    summary = Trainer(cfg, tmp_path / "run", progress=True).run()
    err = capsys.readouterr().err
    assert summary["steps"] == 5  # 8 rollouts per step: the 40-rollout budget binds long before the 50-step cap
    assert "held-out evaluation before training" in err and "held-out evaluation after step 5" in err
    assert "9/9" in err  # 3 greedy + 3 x 2 sampled responses
    # the bar counts the budget, not the step cap
    assert re.search(r"train grpo: 100%.* 40(\.0)?/40(\.0)? .*rollouts", err) and "/50" not in err
    torch.set_num_threads(1)
