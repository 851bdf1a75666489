"""The LLM backend uses transformers' current API: sampling (shared prefill, decoding, pruned rows),
the evaluation and a training step emit no deprecation warning (transformers deprecates the
``past_key_values`` argument for ``cache``; its warning used to print at every evaluation and step,
in the middle of the progress bar)."""

from __future__ import annotations

import warnings
from importlib.metadata import version

import pytest
import torch
from packaging.version import Version

LEGACY_CACHE_REMOVED = Version(version("transformers")) >= Version("5.40")
"""Assumed release from which transformers no longer accepts ``past_key_values`` at all (it then
raises instead of warning, and the second test below covers the API on its own)."""


def _deprecations(caught: list[warnings.WarningMessage]) -> list[str]:
    return [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
            if issubclass(w.category, (DeprecationWarning, FutureWarning, PendingDeprecationWarning))]


@pytest.mark.skipif(LEGACY_CACHE_REMOVED, reason="this transformers no longer accepts past_key_values: "
                                                "there is no deprecation warning left to catch")
def test_legacy_cache_argument_would_be_caught():
    """The check below is real: passing the KV cache the legacy way warns in this transformers."""
    from transformers.cache_utils import DynamicCache

    from llm.testing import micro_model
    model, tok = micro_model()
    with torch.no_grad(), pytest.warns(FutureWarning, match="past_key_values"):
        model(input_ids=torch.tensor([[1, 5, 6]]), past_key_values=DynamicCache(config=model.config), use_cache=True)


def test_sampling_evaluation_and_a_training_step_emit_no_deprecation_warning(tmp_path):
    from llm.backend import SamplingConfig
    from llm.evaluate import EvalConfig, evaluate
    from llm.hf_engine import HFEngine
    from llm.tasks import DATA_DIR, load_problems, make_prompts
    from llm.testing import memorize, micro_model, save_micro_model
    from llm.trainer import TrainConfig, Trainer

    problems = load_problems(DATA_DIR / "arith_sample.jsonl")
    model, tok = micro_model()
    memorize(model, tok, problems[:8], steps=20)
    prompts = make_prompts(problems[:4], tok)
    engine = HFEngine(model, [tok.eos_token_id], tok.pad_token_id)
    model_dir = save_micro_model(tmp_path / "micro", problems, steps=20)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # root rows and branches from a shared prefix, rows ending at different steps (the cache is pruned)
        gens = engine.generate([list(p.ids) for p in prompts], [3, 1, 2, 2], max_new_tokens=[30, 5, 30, 12],
                               prefixes=[[], [7], [], [8, 9]], temperature=1.0, seed=0)
        res = evaluate(engine, tok, prompts, EvalConfig(n_problems=4, samples=2, max_response_tokens=30))
        cfg = TrainConfig(model=str(model_dir), data=None, eval_data=str(DATA_DIR / "arith_sample.jsonl"),
                          method="deep-grpo", overrides={"G": 4, "K": 2}, prompts_per_step=2, steps=1,
                          checkpoint_every=1, sampling=SamplingConfig(max_response_tokens=24),
                          eval=EvalConfig(n_problems=2, samples=1), threads=1, tensorboard=False, seed=0)
        summary = Trainer(cfg, tmp_path / "run", progress=False).run()
    assert len(gens) == 8 and {len(g.token_ids) <= 30 for g in gens} == {True}
    assert 0 <= res["greedy_mean@1"] <= 1 and summary["steps"] == 1
    assert _deprecations(caught) == []
