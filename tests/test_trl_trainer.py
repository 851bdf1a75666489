"""DeepGRPOTrainer (llm/trl_trainer.py): DEEP-GRPO inside TRL's GRPOTrainer, on a micro Llama
built from a config with the character tokenizer (no downloads; HF caches under tmp_path).

* parity: for fixed (scripted) rollouts, the trainer's rows, masks, advantages, loss and
  gradients equal the core's ``assemble_batch`` + ``group_advantages`` + ``dual_stream_loss``;
* aux rows' prefix tokens get exactly zero gradient;
* unsupported settings fail at construction with a ConfigError naming the option;
* (slow) a short run on the arithmetic task raises the training reward;
* (distributed) two processes under ``accelerate launch`` with different aux row counts take
  the single-process step of the global batch (to 1e-6).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deepgrpo.advantages import group_advantages, nonzero_advantage
from deepgrpo.batch import AUX, MAIN
from deepgrpo.config import ConfigError
from deepgrpo.explore import assemble_batch
from deepgrpo.losses import dual_stream_loss
from llm.models import TinyModelConfig, build_char_tokenizer, build_tiny_model, save_pretrained_dir
from llm.rewards import arithmetic_reward
from llm.trl_trainer import DeepGRPOConfig, DeepGRPOTrainer  # needs the trl extra: pip install -e '.[llm,trl]'

MICRO = TinyModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=96)
"""The micro model of these tests: a 2-layer Llama with hidden size 64."""



@pytest.fixture(autouse=True)
def offline_hf(tmp_path, monkeypatch):
    """Nothing from a hub; every HF cache under tmp_path."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")


def arith_reward(completions, answer, **_):
    """TRL reward function of the arithmetic task (1 iff the final answer is right)."""
    return [arithmetic_reward(c, a) for c, a in zip(completions, answer)]


def micro_dir(path: Path, seed: int = 0) -> Path:
    tok = build_char_tokenizer()
    return save_pretrained_dir(build_tiny_model(tok, MICRO, seed=seed), tok, path)


def config(tmp_path: Path, **kw) -> DeepGRPOConfig:
    base = dict(output_dir=str(tmp_path / "out"), report_to="none", save_strategy="no", use_cpu=True,
                logging_steps=1, seed=0, max_completion_length=24, num_generations=4,
                per_device_train_batch_size=4, bf16=False)  # float32: parity to 1e-6
    base.update(kw)
    return DeepGRPOConfig(**base)


# -- scripted rollouts ------------------------------------------------------------------------------

PROMPTS = ["1+2=", "3+4="]
ANSWERS = ["3", "7"]
MAIN_SCRIPT = {  # per prompt: the G = 4 main completions (text; EOS appended)
    "1+2=": ["1+2=3;3", "1+2=4;4", "1+2=30;30", "1+2=3;3"],
    "3+4=": ["3+4=8;8", "3+4=9;9", "3+4=81;81", "3+4=6;6"],
    "2+2=": ["2+2=4;4", "2+2=4;4", "2+2=5;5", "2+2=4;4"],  # the 2-process test's second rank:
    "5+1=": ["5+1=6;6", "5+1=6;6", "5+1=6;6", "5+1=6;6"],  # fewer failures, fewer aux rows
}
BRANCH_SUFFIXES = ["3;3", "7;7", "=7;7", "9;9", ";3"]


def scripted_generator(tok, calls: list):
    """A stand-in for ``GRPOTrainer._generate_single_turn``: main completions from MAIN_SCRIPT,
    branch suffixes cycling through BRANCH_SUFFIXES (deterministic, so rollouts are fixed)."""
    eos = tok.eos_token_id

    def generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        calls.append([list(p) for p in prompt_ids])
        out = []
        if len(calls) % 2 == 1:  # main call: rows are prompts, G consecutive copies each
            for i, ids in enumerate(prompt_ids):
                text = tok.decode(ids, skip_special_tokens=True)
                out.append(tok(MAIN_SCRIPT[text][i % 4])["input_ids"][1:] + [eos])
        else:  # branch call: rows are prompt + prefix
            for i in range(len(prompt_ids)):
                out.append(tok(BRANCH_SUFFIXES[i % len(BRANCH_SUFFIXES)])["input_ids"][1:] + [eos])
        return out, None
    return generate


def scripted_step(tmp_path: Path, **kw):
    """One generation of a DeepGRPOTrainer with scripted rollouts; returns the trainer, the
    micro-batches TRL would feed to compute_loss, and the summed loss with its gradients."""
    from datasets import Dataset
    tok = build_char_tokenizer()
    path = micro_dir(tmp_path / "model")
    ds = Dataset.from_dict({"prompt": PROMPTS, "answer": ANSWERS})
    args = config(tmp_path, gradient_accumulation_steps=2, beta=0.05, K=3, max_steps=1, segmenter="step", **kw)
    trainer = DeepGRPOTrainer(model=str(path), reward_funcs=arith_reward, args=args, train_dataset=ds,
                              processing_class=tok)
    with torch.no_grad():  # move the policy away from the reference so that the KL terms are not 0
        g = torch.Generator().manual_seed(1)
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    calls: list = []
    trainer._generate_single_turn = scripted_generator(tok, calls)
    trainer.model.train()
    rows = [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, ANSWERS) for _ in range(4)]
    trainer._prepare_inputs(rows)
    chunks = list(trainer._buffered_inputs)
    trainer.model.zero_grad(set_to_none=True)
    total = 0.0
    for chunk in chunks:
        loss = trainer.compute_loss(trainer.model, chunk)
        loss.backward()
        total += float(loss.detach())
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return trainer, tok, chunks, total, grads, calls


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    return scripted_step(tmp_path_factory.mktemp("scripted"))


def plain_logprobs(model, prompt_ids: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` log p(token | prompt, earlier tokens) from one plain forward (equal-length prompts)."""
    Lp = prompt_ids.shape[1]
    ids = torch.cat([prompt_ids, torch.where(mask, tokens, torch.zeros_like(tokens))], dim=1)
    attn = torch.cat([torch.ones_like(prompt_ids), mask.long()], dim=1)
    logits = model(input_ids=ids, attention_mask=attn).logits[:, Lp - 1:-1].float()  # [B, T, V]
    return torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def gathered_rows(chunks) -> dict[str, torch.Tensor]:
    """The trainer's real rows (padding dropped), in the order of the core's batch."""
    cat = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0] if chunks[0][k].ndim > 0}
    keep = cat["row"] >= 0
    order = torch.argsort(cat["row"][keep])
    return {k: v[keep][order] for k, v in cat.items()}


# -- tests --------------------------------------------------------------------------------------------

def test_scripted_rollouts_branch_from_exact_prefixes(scripted):
    trainer, tok, chunks, _, _, calls = scripted
    res = trainer.last_exploration
    assert len(calls) == 2 and len(res.plan) == res.stats["failed"] == 6  # one pivot per failed chain
    assert res.stats["pivots"] == 6 and len(res.aux) == 18  # K = 3 continuations per pivot
    prompt_len = len(tok(PROMPTS[0])["input_ids"])
    owners = np.repeat(np.arange(len(res.plan)), res.plan.n)
    for row, j in zip(calls[1], owners):  # generator saw exactly prompt + prefix ids
        traj, pl = int(res.plan.traj[j]), int(res.plan.prefix_len[j])
        prompt = tok(PROMPTS[traj // 4])["input_ids"]
        assert row == prompt + res.main.tokens[traj, :pl].tolist()
        assert len(row) == prompt_len + pl
    # rows are padded (never dropped) to a multiple of steps_per_generation
    assert len(chunks) == 2 and chunks[0]["row"].shape == chunks[1]["row"].shape
    rows = torch.cat([c["row"] for c in chunks])
    assert sorted(rows[rows >= 0].tolist()) == res.batch.extras["row"].tolist()


def test_parity_with_core_assemble_batch_and_dual_stream_loss(scripted):
    """Masks, advantages, loss and gradients equal the core's on the same rollouts and plan."""
    trainer, tok, chunks, total, grads, _ = scripted
    res = trainer.last_exploration
    batch = assemble_batch(list(range(2)), res.main, res.aux, res.plan, 4)
    batch.advantages = group_advantages(batch.rewards, batch.group, trainer.algo.advantage)
    batch = batch.select(nonzero_advantage(batch.advantages, trainer.algo.advantage.zero_eps))
    rows = gathered_rows(chunks)
    assert len(batch) == rows["row"].shape[0] and (batch.stream == AUX).sum() > 0 and (batch.stream == MAIN).sum() > 0
    assert torch.equal(rows["completion_mask"].bool(), batch.response_mask)
    assert torch.equal(rows["trainable_mask"], batch.trainable_mask)
    assert torch.equal(torch.where(batch.response_mask, rows["completion_ids"], 0), batch.tokens)
    assert torch.equal(rows["stream"], batch.stream) and torch.equal(rows["group"], batch.group)
    assert torch.equal(rows["prefix_len"], batch.prefix_len)
    assert torch.allclose(rows["advantages"], batch.advantages.float(), atol=1e-7, rtol=0)
    # the core's loss with independently computed log-probs
    prompt_ids = torch.tensor([tok(PROMPTS[i])["input_ids"] for i in batch.prompt_index.tolist()])
    model = trainer.model
    model.zero_grad(set_to_none=True)
    lp = plain_logprobs(model, prompt_ids, batch.tokens, batch.response_mask)
    with torch.no_grad():
        ref = plain_logprobs(trainer.ref_model, prompt_ids, batch.tokens, batch.response_mask)
    batch.old_logprobs = lp.detach()
    out = dual_stream_loss(batch, lp, ref, trainer.algo.loss)
    out.loss.backward()
    assert out.metrics["kl_main"] > 0 and out.metrics["pg_aux"] != 0
    assert abs(total - float(out.loss.detach())) < 1e-6
    for name, p in model.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-6, rtol=1e-5), name
    logged = trainer._metrics["train"]
    for k in ("pg_main", "pg_aux", "kl_main", "kl_aux"):
        assert abs(logged[k][-1] - out.metrics[k]) < 1e-6, k


def test_aux_prefix_tokens_get_exactly_zero_gradient(scripted, tmp_path):
    trainer, _, chunks, _, _, _ = scripted
    captured = []
    original = trainer._get_per_token_logps_and_entropies

    def capture(*args, **kwargs):
        lp, ent, aux = original(*args, **kwargs)
        lp.retain_grad()
        captured.append(lp)
        return lp, ent, aux
    trainer._get_per_token_logps_and_entropies = capture
    try:
        for chunk in chunks:
            trainer.compute_loss(trainer.model, chunk).backward()
    finally:
        trainer._get_per_token_logps_and_entropies = original
    checked = 0
    for chunk, lp in zip(chunks, captured):
        for b in range(lp.shape[0]):
            pl = int(chunk["prefix_len"][b])
            if int(chunk["stream"][b]) == AUX and pl > 0:
                assert torch.count_nonzero(lp.grad[b, :pl]) == 0
                assert torch.count_nonzero(lp.grad[b, pl:]) > 0
                checked += 1
    assert checked > 0


def test_core_metric_names_are_logged(scripted):
    trainer = scripted[0]
    logged = trainer._metrics["train"]
    for name in ("rollouts_main", "rollouts_aux", "tokens_main", "tokens_aux", "pivots", "pivot_depth_mean",
                 "branch_success", "failed", "all_fail_groups", "nonzero_main", "nonzero_aux", "pg_main", "pg_aux",
                 "kl_main", "kl_aux", "clip_fraction", "dual_clip_fraction", "est_rel_depth", "est_intercept"):
        assert name in logged, name
    res = trainer.last_exploration
    assert logged["rollouts_aux"][-1] == len(res.aux) == 18
    assert logged["tokens_aux"][-1] == float(res.aux.lengths.sum())
    assert logged["tokens_main"][-1] == float(res.main.lengths.sum())


def test_checkpoint_state_round_trips_through_json(scripted, tmp_path):
    """Estimator, branch RNG and budget ledgers go into every checkpoint (one JSON per process)."""
    import json

    from deepgrpo.records import write_json_atomic
    trainer = scripted[0]
    path = write_json_atomic(tmp_path / "state.json", trainer.deep_state())
    feats = {k: v for k, v in trainer.last_exploration.candidates.features.items()}
    before, n_before = trainer.estimator.predict(feats), trainer.estimator.buffer_len
    draws = trainer.branch_rng.random(3)
    trainer.estimator.update({k: v[:1] for k, v in feats.items()}, np.ones(1))
    trainer.ledger.record(1, 1, 1, 1, 1)
    trainer.load_deep_state(json.loads(path.read_text()))
    assert np.allclose(trainer.estimator.predict(feats), before) and trainer.estimator.buffer_len == n_before
    assert np.array_equal(trainer.branch_rng.random(3), draws)
    assert trainer.ledger.totals()["rollouts_aux"] == 18


@pytest.mark.parametrize("kw, option", [
    (dict(K=0), "K"),
    (dict(gamma=-1.0), "gamma"),
    (dict(lam=-0.5), "lam"),
    (dict(strategy="nope"), "strategy"),
    (dict(estimator="tree"), "estimator"),  # the core's EstimatorConfig.kind, reported under the option's name
    (dict(segmenter="words"), "segmenter"),
    (dict(G=6), "G"),
    (dict(use_vllm=True, vllm_mode="server"), "vllm_mode"),
    (dict(use_vllm=True, vllm_mode="colocate", vllm_tensor_parallel_size=2), "vllm_tensor_parallel_size"),
    (dict(use_vllm=True, vllm_mode="colocate", vllm_enable_sleep_mode=True), "vllm_enable_sleep_mode"),
    (dict(use_vllm=True), "vllm_importance_sampling_mode"),  # TRL's default sequence_mask is not the core's
    (dict(steps_per_generation=2), "steps_per_generation"),
    (dict(loss_type="cispo"), "loss_type"),
    (dict(scale_rewards="batch"), "scale_rewards"),
    (dict(mask_truncated_completions=True), "mask_truncated_completions"),
])
def test_unsupported_or_invalid_settings_fail_at_construction(tmp_path, kw, option):
    with pytest.raises(ConfigError) as err:
        config(tmp_path, **kw)
    assert option in str(err.value)


def test_config_defaults_are_the_cores(tmp_path):
    from deepgrpo.config import EstimatorConfig, ExploreConfig, LossConfig
    cfg = config(tmp_path)
    algo = cfg.algo_config()
    assert algo.explore == ExploreConfig(G=4)
    assert algo.estimator == EstimatorConfig()
    assert algo.loss == LossConfig()  # TRL's epsilon 0.2, dapo = token-mean, beta = the core's 1e-4
    assert not algo.advantage.scale_std


def test_vllm_colocate_maps_to_the_cores_truncated_importance_sampling(tmp_path):
    cfg = config(tmp_path, use_vllm=True, vllm_mode="colocate", vllm_importance_sampling_mode="token_truncate",
                 vllm_importance_sampling_clip_max=2.0)
    assert cfg.algo_config().loss.tis_cap == 2.0
    cfg = config(tmp_path, use_vllm=True, vllm_importance_sampling_correction=False)
    assert cfg.algo_config().loss.tis_cap is None


def test_reward_models_and_tools_are_rejected(tmp_path):
    from datasets import Dataset
    tok = build_char_tokenizer()
    ds = Dataset.from_dict({"prompt": PROMPTS, "answer": ANSWERS})
    path = str(micro_dir(tmp_path / "m"))
    with pytest.raises(ConfigError, match="reward_funcs"):
        DeepGRPOTrainer(model=path, reward_funcs="some/reward-model", args=config(tmp_path), train_dataset=ds,
                        processing_class=tok)
    with pytest.raises(ConfigError, match="tools"):
        DeepGRPOTrainer(model=path, reward_funcs=arith_reward, args=config(tmp_path), train_dataset=ds,
                        processing_class=tok, tools=[len])


def test_command_line_trains_on_a_local_model_and_dataset(tmp_path):
    """``python -m llm.trl_trainer --model DIR --data FILE ...`` (the README's launch target)."""
    from llm.tasks import DATA_DIR
    from llm.trl_trainer import main, task_reward
    assert task_reward(["1+2=3;3", "1+2=3;4"], ["3", "3"], ["arith", "arith"]) == [1.0, 0.0]
    assert task_reward([[{"role": "assistant", "content": "so #### 12"}]], ["12"], ["gsm8k"]) == [1.0]
    model = micro_dir(tmp_path / "model")
    out = tmp_path / "run"
    main(["--model", str(model), "--data", str(DATA_DIR / "arith_sample.jsonl"), "--output_dir", str(out),
          "--max_steps", "1", "--num_generations", "4", "--per_device_train_batch_size", "8",
          "--max_completion_length", "16", "--segmenter", "step", "--use_cpu", "true", "--bf16", "false",
          "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true"])
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


# -- the learned informative selector -------------------------------------------------------------------

def sampling_entropy(model, prompt_ids: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                     temperature: float, top_p: float) -> torch.Tensor:
    """``[B, T]`` entropy of softmax(logits / T) renormalised over the top-p nucleus (the smallest
    set of top tokens whose mass reaches top_p) predicting each completion token, 0 where masked:
    one plain forward (equal-length prompts), written out independently of llm.engine."""
    Lp = prompt_ids.shape[1]
    ids = torch.cat([prompt_ids, torch.where(mask, tokens, torch.zeros_like(tokens))], dim=1)
    attn = torch.cat([torch.ones_like(prompt_ids), mask.long()], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits[:, Lp - 1:-1].double()  # [B, T, V]
    p = torch.softmax(logits / temperature, -1)
    if top_p < 1:
        sp, order = p.sort(-1, descending=True)
        keep = torch.zeros_like(sp, dtype=torch.bool).scatter(-1, order, (sp.cumsum(-1) - sp) < top_p)
        p = torch.where(keep, p, 0.0)
        p = p / p.sum(-1, keepdim=True)
    ent = -(torch.where(p > 0, p * p.clamp_min(1e-300).log(), 0.0)).sum(-1)
    return torch.where(mask, ent, 0.0)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_learned_informative_selector_trains_a_step_on_the_policys_next_entropy(tmp_path, top_p):
    """estimator='selector' with strategy 'informative': the main completions carry the candidate
    feature next_entropy, the entropy of the policy's sampling distribution (temperature 0.7, and
    the top-p nucleus) after t tokens, equal to a recomputation; the selector learns from the
    step's pivots (their counts of successes) and the step updates the policy."""
    from transformers import AutoModelForCausalLM
    model = micro_dir(tmp_path / "model")
    trainer = real_trainer(model, tmp_path, estimator="selector", strategy="informative", max_steps=1,
                           save_strategy="no", temperature=0.7, top_p=top_p)
    trainer.train()
    res = trainer.last_exploration
    main = res.main
    ent = main.extras["cand_next_entropy"]  # [Bm, Tm+1]
    assert ent.shape == (len(main), main.tokens.shape[1] + 1) and ent.dtype == torch.float64
    tok = build_char_tokenizer()
    prompts = [PROMPTS[b // 4] for b in range(len(main))]  # G = 4 consecutive rows per prompt, in order
    prompt_ids = torch.tensor([tok(q)["input_ids"] for q in prompts])
    initial = AutoModelForCausalLM.from_pretrained(str(model)).float().eval()
    want = sampling_entropy(initial, prompt_ids, main.tokens, main.mask, 0.7, top_p)
    assert float((ent[:, :-1] - want).abs().max()) < 1e-5 and (ent[:, -1] == 0).all()
    assert float(want.max()) > 0.1
    c = res.candidates
    assert len(c) and np.array_equal(c.features["next_entropy"], ent.numpy()[c.traj, c.prefix_len])
    assert "prefix_logprob" in c.features and np.abs(c.features["prefix_logprob"]).max() > 0  # log-probs too
    est = trainer.estimator.inner
    assert "next_entropy" in est.feature_names
    assert est.buffer_len == len(res.plan) > 0
    assert est.state_dict()["trials"].tolist() == res.plan.n.astype(float).tolist()
    moved = max(float((p.detach().cpu() - q.detach()).abs().max()) for p, q in
                zip(trainer.accelerator.unwrap_model(trainer.model).parameters(), initial.parameters()))
    assert moved > 0


@pytest.mark.parametrize("kw,option", [(dict(top_k=5), "top_k"), (dict(repetition_penalty=1.2), "repetition_penalty"),
                                       (dict(generation_kwargs={"min_p": 0.1}), "min_p")])
def test_selector_refuses_sampling_options_its_entropy_does_not_model(tmp_path, kw, option):
    with pytest.raises(ConfigError) as err:
        config(tmp_path, estimator="selector", strategy="informative", **kw)
    assert option in str(err.value) and "next_entropy" in str(err.value)
    config(tmp_path, estimator="position", **kw)  # the other estimators do not read it


# -- checkpoints, logging, MoE ------------------------------------------------------------------------------

def real_trainer(model: Path, tmp_path: Path, **kw) -> DeepGRPOTrainer:
    """A DeepGRPOTrainer on scripted rollouts (2 prompts x G = 4 per step, K = 2), a checkpoint after
    every step, one log line every 2 steps, an estimator fitted from the first labels."""
    from datasets import Dataset
    base = dict(save_strategy="steps", save_steps=1, max_steps=2, logging_steps=2, K=2, segmenter="step",
                max_completion_length=16, per_device_train_batch_size=8, disable_tqdm=True,
                estimator_min_per_class=1, learning_rate=1e-3)
    base.update(kw)
    tok = build_char_tokenizer()
    ds = Dataset.from_dict({"prompt": PROMPTS, "answer": ANSWERS})
    trainer = DeepGRPOTrainer(model=str(model), reward_funcs=arith_reward, args=config(tmp_path, **base),
                              train_dataset=ds, processing_class=tok)
    trainer._generate_single_turn = scripted_generator(tok, [])
    return trainer


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """(trainer, model dir, output dir) of a finished 2-step run with checkpoint-1 and checkpoint-2."""
    root = tmp_path_factory.mktemp("two_steps")
    model = micro_dir(root / "model")
    trainer = real_trainer(model, root, output_dir=str(root / "out"))
    trainer.train()
    return trainer, model, root / "out"


def copy_run(out: Path, to: Path) -> Path:
    import shutil
    return Path(shutil.copytree(out, to))


def saved_ledger(checkpoint: Path) -> list[dict]:
    import json
    return json.loads((checkpoint / "deepgrpo_state_0.json").read_text())["ledger"]


def test_logging_steps_2_logs_the_running_budget_at_its_latest_value(two_steps):
    """With one log line per 2 steps, rollouts_*/tokens_* are the run's totals at the logged step
    (not the mean of the two steps' totals) and step_* the mean per step of the window."""
    trainer = two_steps[0]
    lines = [h for h in trainer.state.log_history if "rollouts_main" in h]
    assert [h["step"] for h in lines] == [2]
    steps = trainer._global_ledger.steps
    assert len(steps) == 2 and steps[0].rollouts_aux > 0
    for name in ("rollouts_main", "rollouts_aux", "tokens_main", "tokens_aux"):
        per_step = [getattr(s, name) for s in steps]
        assert lines[0][name] == sum(per_step), name  # the total after step 2
        assert lines[0][f"step_{name}"] == pytest.approx(np.mean(per_step)), name
    totals = trainer._global_ledger.totals()
    assert lines[0]["rollouts"] == totals["rollouts"] and lines[0]["tokens"] == totals["tokens"]
    coef = trainer.estimator.inner.coefficients()  # the estimator's state after step 2
    assert lines[0]["est_rel_depth"] == pytest.approx(float(coef["rel_depth"]))
    assert lines[0]["est_intercept"] == pytest.approx(float(coef["intercept"]))


def test_checkpoint_state_is_json_written_before_trl_marks_the_checkpoint_complete(two_steps):
    """Each checkpoint holds the DEEP-GRPO state as JSON, written before TRL's last file
    (trainer_state.json), so a save cut short between them never looks complete."""
    import json
    out = two_steps[2]
    for step in (1, 2):
        ck = out / f"checkpoint-{step}"
        state = json.loads((ck / "deepgrpo_state_0.json").read_text())
        assert len(state["ledger"]) == step
        assert (ck / "deepgrpo_state_0.json").stat().st_mtime_ns < (ck / "trainer_state.json").stat().st_mtime_ns


@pytest.mark.parametrize("cut_short", ["trainer_state.json", "deepgrpo_state_0.json"])
def test_resume_true_skips_a_checkpoint_whose_save_was_cut_short(two_steps, tmp_path, cut_short):
    """checkpoint-2 lacks TRL's last file (killed inside TRL's save) or the DEEP-GRPO state (killed
    between TRL's save and the state write, in the old order): resume_from_checkpoint=True takes
    checkpoint-1, its estimator and ledgers, and trains step 2 again."""
    from llm.trl_trainer import last_complete_checkpoint
    _, model, out = two_steps
    run = copy_run(out, tmp_path / "out")
    (run / "checkpoint-2" / cut_short).unlink()
    assert last_complete_checkpoint(run) == run / "checkpoint-1"
    trainer = real_trainer(model, tmp_path, output_dir=str(run))
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 2
    assert len(trainer.ledger.steps) == 2  # step 1 restored from checkpoint-1, step 2 trained again
    assert vars(trainer.ledger.steps[0]) == saved_ledger(out / "checkpoint-1")[0]


def test_resume_refuses_a_checkpoint_without_its_deep_state_unless_asked_to_start_fresh(two_steps, tmp_path):
    _, model, out = two_steps
    run = copy_run(out, tmp_path / "out")
    (run / "checkpoint-2" / "deepgrpo_state_0.json").unlink()
    trainer = real_trainer(model, tmp_path, output_dir=str(run), max_steps=3)
    with pytest.raises(ConfigError, match="deepgrpo_state_0.json.*resume_without_deep_state") as err:
        trainer.train(resume_from_checkpoint=str(run / "checkpoint-2"))
    assert err.value.field == "resume_from_checkpoint"
    assert trainer.state.global_step == 0 and not trainer.ledger.steps  # refused before anything ran
    # the explicit option: TRL's checkpoint with a fresh estimator and ledgers
    trainer = real_trainer(model, tmp_path, output_dir=str(run), max_steps=3, resume_without_deep_state=True)
    with pytest.warns(UserWarning, match="fresh estimator"):
        trainer.train(resume_from_checkpoint=str(run / "checkpoint-2"))
    assert trainer.state.global_step == 3 and len(trainer.ledger.steps) == 1
    # nothing complete to resume from
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        real_trainer(model, tmp_path, output_dir=str(empty)).train(resume_from_checkpoint=True)


def test_resume_reads_the_state_as_data_and_refuses_a_pickle_without_running_it(two_steps, tmp_path):
    import pickle
    _, model, out = two_steps
    run = copy_run(out, tmp_path / "out")
    marker = tmp_path / "code-was-run"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))
    (run / "checkpoint-1" / "deepgrpo_state_0.json").write_bytes(pickle.dumps(Payload()))
    trainer = real_trainer(model, tmp_path, output_dir=str(run))
    with pytest.raises(ConfigError, match="deepgrpo_state_0.json.* is not a JSON DEEP-GRPO state"):
        trainer.train(resume_from_checkpoint=str(run / "checkpoint-1"))
    assert not marker.exists()


def micro_moe_dir(path: Path, router_aux_loss_coef: float = 0.02, seed: int = 0) -> Path:
    """A 1-layer Mixtral (4 experts, 2 per token) with the character tokenizer, built from a config."""
    from transformers import AutoModelForCausalLM, MixtralConfig
    tok = build_char_tokenizer()
    cfg = MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=96, tie_word_embeddings=True,
                        router_aux_loss_coef=router_aux_loss_coef, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return save_pretrained_dir(AutoModelForCausalLM.from_config(cfg).float(), tok, path)


def test_moe_model_trains_with_its_router_load_balancing_loss(tmp_path):
    """A micro Mixtral trains: the loss is the core's plus coef x the router loss / accumulation
    steps (coef = the model config's 0.02), the router moves, router_aux_loss is logged; with
    router_aux_loss_coef = 0.0 the term is off."""
    from datasets import Dataset
    tok = build_char_tokenizer()
    path = micro_moe_dir(tmp_path / "moe")
    ds = Dataset.from_dict({"prompt": PROMPTS, "answer": ANSWERS})
    args = config(tmp_path, gradient_accumulation_steps=2, K=3, max_steps=1, segmenter="step", disable_tqdm=True)
    trainer = DeepGRPOTrainer(model=str(path), reward_funcs=arith_reward, args=args, train_dataset=ds,
                              processing_class=tok)
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.02
    trainer._generate_single_turn = scripted_generator(tok, [])
    gate = dict(trainer.model.named_parameters())["model.layers.0.mlp.gate.weight"]
    before = gate.detach().clone()
    trainer.train()
    assert not torch.equal(gate.detach(), before)
    logged = [h["router_aux_loss"] for h in trainer.state.log_history if "router_aux_loss" in h]
    assert len(logged) == 1 and logged[0] > 0
    # the loss of each micro-batch of the next generation, with and without the router term
    rows = [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, ANSWERS) for _ in range(4)]
    trainer._prepare_inputs(rows)
    for chunk in list(trainer._buffered_inputs):
        with torch.no_grad():
            with_router = float(trainer.compute_loss(trainer.model, chunk))
            trainer.aux_loss_enabled = False
            without = float(trainer.compute_loss(trainer.model, chunk))
            trainer.aux_loss_enabled = True
            ids = torch.cat([chunk["prompt_ids"], chunk["completion_ids"]], dim=1)
            attn = torch.cat([chunk["prompt_mask"], chunk["completion_mask"]], dim=1)
            router = float(trainer.model(input_ids=ids, attention_mask=attn, output_router_logits=True).aux_loss)
        assert router > 0
        assert with_router - without == pytest.approx(0.02 * router / 2, abs=1e-6)
    off = DeepGRPOTrainer(model=str(path), reward_funcs=arith_reward, train_dataset=ds, processing_class=tok,
                          args=config(tmp_path, router_aux_loss_coef=0.0, max_steps=1))
    assert not off.aux_loss_enabled


# -- the command line ------------------------------------------------------------------------------------

def cli(tmp_path: Path, model: Path | str, *extra: str, data: Path | str | None = None) -> list[str]:
    from llm.tasks import DATA_DIR
    return ["--model", str(model), "--data", str(data or DATA_DIR / "arith_sample.jsonl"),
            "--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--num_generations", "4",
            "--per_device_train_batch_size", "8", "--max_completion_length", "16", "--segmenter", "step",
            "--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--save_strategy", "no",
            "--disable_tqdm", "true", *extra]


def run_main(argv: list[str], capsys) -> tuple[int, list[str]]:
    """Exit code and stderr lines of ``python -m llm.trl_trainer ARGV`` (run in this process)."""
    from llm.trl_trainer import main
    capsys.readouterr()  # what the test printed before
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def test_command_line_refuses_a_model_that_is_not_a_local_directory(tmp_path, capsys):
    """A hub name is refused before anything is loaded (nothing is downloaded)."""
    code, err = run_main(cli(tmp_path, "some-org/some-model"), capsys)
    assert code == 2
    assert err == ["python -m llm.trl_trainer: error: --model = 'some-org/some-model' is invalid: no such directory"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case, extra, message", [
    ("K", ["--K", "0"], "--K: DeepGRPOConfig.K = 0 is invalid: expected an integer in [2, inf)"),
    ("groups", ["--per_device_train_batch_size", "6"],
     "--per_device_train_batch_size: DeepGRPOConfig.per_device_train_batch_size = 6 is invalid"),
    ("loss_type", ["--loss_type", "cispo"], "--loss_type: DeepGRPOConfig.loss_type = 'cispo' is invalid"),
    ("empty data", [], "--data = '{empty}' is invalid: the file is empty"),
    ("missing model", [], "--model = '{missing}' is invalid: no such directory"),
    ("missing data", [], "--data = '{missing}' is invalid: no such file"),
    ("unknown option", ["--nonsense", "1"], "unrecognized arguments: --nonsense 1"),
    ("bad value", ["--gamma", "x"], "argument --gamma: invalid float value: 'x'"),
    ("resume", ["--resume_from_checkpoint", "{missing}"],
     "--resume_from_checkpoint = '{missing}' is invalid: no such directory"),
    ("resume true", ["--resume_from_checkpoint", "true"],
     "--resume_from_checkpoint = true is invalid: --output_dir = '{run}' holds no complete checkpoint"),
    ("remote code", ["--trust_remote_code", "true"], "--trust_remote_code = True is not supported"),
])
def test_command_line_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case, extra, message):
    model, empty, missing = micro_dir(tmp_path / "model"), tmp_path / "empty.jsonl", tmp_path / "missing"
    empty.write_text("")
    argv = cli(tmp_path, missing if case == "missing model" else model,
               *[x.format(missing=missing) for x in extra],
               data=empty if case == "empty data" else missing if case == "missing data" else None)
    code, err = run_main(argv, capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("python -m llm.trl_trainer: error: "), err
    assert message.format(empty=empty, missing=missing, run=tmp_path / "run") in err[0]


def test_command_line_refuses_an_output_dir_another_process_writes(tmp_path, capsys):
    """One writer per directory: while another process holds --output_dir, the command exits 2
    in one line before loading or writing anything."""
    import subprocess
    import sys
    hold = ("import sys, time; from deepgrpo.records import lock_output; lock_output(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        code, err = run_main(cli(tmp_path, micro_dir(tmp_path / "model")), capsys)
    finally:
        proc.kill()
        proc.wait()
    assert code == 2 and len(err) == 1 and f"is in use by process {proc.pid}" in err[0], err
    assert not (tmp_path / "run").exists()


def test_command_line_resumes_from_a_checkpoint(two_steps, tmp_path, capsys):
    """--resume_from_checkpoint DIR (or true: the newest complete one in --output_dir) continues
    that run: with nothing left to train, the saved model is the checkpoint's, not --model's."""
    from safetensors.torch import load_file
    _, _, out = two_steps
    other = micro_dir(tmp_path / "other", seed=1)  # different weights than the run's
    run = copy_run(out, tmp_path / "run")
    weights = {k: load_file(str(d / "model.safetensors")) for k, d in (("other", other), ("ck", out / "checkpoint-2"))}
    assert any(not torch.equal(v, weights["ck"][n]) for n, v in weights["other"].items())
    for resume in (str(out / "checkpoint-2"), "true"):
        code, err = run_main(cli(tmp_path, other, "--max_steps", "2", "--resume_from_checkpoint", resume), capsys)
        assert code == 0, err
        final = load_file(str(run / "model.safetensors"))
        assert all(torch.equal(v, final[n]) for n, v in weights["ck"].items()), resume


def test_command_line_any_os_error_is_one_line_exit_2(tmp_path, capsys):
    """An operating-system failure other than a full disk (checkpoint-2's config.json is a
    directory) is one line naming it and what was kept, exit 2, not a traceback."""
    run = tmp_path / "run"
    (run / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "a-directory").mkdir()
    (run / "checkpoint-2" / "config.json").symlink_to(tmp_path / "a-directory")
    argv = cli(tmp_path, micro_dir(tmp_path / "model"), "--max_steps", "2", "--save_strategy", "steps",
               "--save_steps", "1")
    code, err = run_main(argv, capsys)
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith("python -m llm.trl_trainer: error: is a directory: ") and \
        err[-1].endswith(f"the last complete checkpoint is {run / 'checkpoint-1'}: continue with "
                         f"--resume_from_checkpoint {run / 'checkpoint-1'}"), err


def test_command_line_disk_full_is_one_line_exit_2_and_the_run_stays_resumable(tmp_path, capsys):
    """ENOSPC while checkpoint-2 is written (its config.json is /dev/full): one line naming the
    error and the output directory, exit 2; checkpoint-2 does not look complete."""
    from llm.trl_trainer import last_complete_checkpoint
    run = tmp_path / "run"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoint-2" / "config.json").symlink_to("/dev/full")
    argv = cli(tmp_path, micro_dir(tmp_path / "model"), "--max_steps", "2", "--save_strategy", "steps",
               "--save_steps", "1")
    code, err = run_main(argv, capsys)
    assert code == 2
    assert "Traceback" not in "\n".join(err)
    assert err[-1:] == [f"python -m llm.trl_trainer: error: no space left on device: under {run}; the last complete "
                   f"checkpoint is {run / 'checkpoint-1'}: continue with --resume_from_checkpoint "
                   f"{run / 'checkpoint-1'}"]
    assert last_complete_checkpoint(run) == run / "checkpoint-1"
    assert not (run / "checkpoint-2" / "trainer_state.json").exists()


# -- a short real run ----------------------------------------------------------------------------------

def sampled_accuracy(model, tok, problems, n: int = 16, max_new_tokens: int = 24, seed: int = 0) -> float:
    """Mean reward of ``n`` samples (T = 1) per problem, by plain transformers generate."""
    torch.manual_seed(seed)
    model.eval()
    total = 0.0
    with torch.no_grad():
        for p in problems:
            ids = torch.tensor([tok(p.question)["input_ids"]] * n)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=1.0, top_k=0, max_new_tokens=max_new_tokens,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            texts = tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
            total += sum(arithmetic_reward(t, p.answer) for t in texts)
    return total / (n * len(problems))


@pytest.mark.slow
def test_short_run_on_arithmetic_raises_training_reward(tmp_path):
    """SFT a micro model briefly (mixed rewards), then 60 DeepGRPOTrainer steps (2 prompts x G = 8
    each, K = 4): the sampled accuracy on the 16 training problems rises (measured with trl 1.16 and
    transformers 5.25: 0.359 -> 0.512; earlier versions gave 0.305 -> 0.44-0.54 over seeds 0-2 and lr
    3e-4-5e-4)."""
    from datasets import Dataset

    from llm.tasks import ArithmeticConfig, ArithmeticStream
    from llm.testing import memorize
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, MICRO, seed=0)
    stream = ArithmeticStream(ArithmeticConfig(min_terms=2, max_terms=3, max_digits=1), seed=0)
    problems = [stream.problem_at(i) for i in range(16)]
    memorize(model, tok, problems, steps=60)
    path = save_pretrained_dir(model, tok, tmp_path / "sft")
    before = sampled_accuracy(model, tok, problems)
    ds = Dataset.from_dict({"prompt": [p.question for p in problems], "answer": [p.answer for p in problems]})
    args = config(tmp_path, segmenter="step", per_device_train_batch_size=16, num_generations=8, K=4,
                  max_steps=60, learning_rate=5e-4, lr_scheduler_type="constant", beta=0.0,
                  estimator_min_per_class=2, disable_tqdm=True)
    trainer = DeepGRPOTrainer(model=str(path), reward_funcs=arith_reward, args=args, train_dataset=ds,
                              processing_class=tok)
    from transformers.trainer_callback import PrinterCallback
    trainer.remove_callback(PrinterCallback)  # the log history is read below
    trainer.train()
    after = sampled_accuracy(trainer.model, tok, problems)
    rewards = [h["reward_main"] for h in trainer.state.log_history if "reward_main" in h]
    print(f"sampled accuracy {before:.3f} -> {after:.3f}; training reward first 20 steps "
          f"{np.mean(rewards[:20]):.3f}, last 20 {np.mean(rewards[-20:]):.3f}")
    assert after > before + 0.1
    assert np.mean(rewards[-20:]) > np.mean(rewards[:20])
    assert sum(h.get("step_rollouts_aux", 0) for h in trainer.state.log_history) > 0


# -- two processes --------------------------------------------------------------------------------------

def launch_trl_workers(tmp_path: Path, *worker_args: str) -> dict:
    """Run tests/trl_dist_worker.py under accelerate launch on 2 CPU processes; its result.json."""
    import json
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).with_name("trl_dist_worker.py")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="", TRL_EXPERIMENTAL_SILENCE="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    # `--cpu --num_processes 2` starts a single process unless MPI is configured; `--multi_gpu`
    # on a machine without CUDA starts 2 torchrun processes on the CPU (gloo)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), str(worker), str(tmp_path), *worker_args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((tmp_path / "result.json").read_text())


@pytest.mark.distributed
def test_two_processes_take_the_single_process_step(tmp_path):
    """accelerate launch, 2 CPU processes (gloo): the ranks branch different numbers of rows,
    end with identical parameters, and those equal the single-process step on the global batch
    (checked inside the worker); the checkpoint holds both ranks' DEEP-GRPO state files, written
    before TRL's trainer_state.json."""
    result = launch_trl_workers(tmp_path)
    assert result["aux_rows"][0] != result["aux_rows"][1]
    assert result["max_param_diff_between_ranks"] == 0.0
    assert result["max_diff_to_single_process_step"] < 1e-6
    assert result["param_change"] > 1e-4
    # the checkpoint of the step: each rank's DEEP-GRPO state, on disk before TRL marked it complete
    assert result["state_ledgers"] == [1, 1] and result["states_written_before_trainer_state"]


@pytest.mark.distributed
def test_two_processes_run_the_learned_informative_selector(tmp_path):
    """The selector under accelerate launch (2 CPU processes): each rank computes next_entropy on its
    own main completions (a no-grad forward pass of the DDP model), every rank's estimator learns
    from both ranks' pivots, and the step is still the single-process step of the global batch."""
    result = launch_trl_workers(tmp_path, "selector")
    assert all(m is not None and m > 0 for m in result["next_entropy_max"])
    assert result["estimator_points"] == [sum(result["pivots"])] * 2 and sum(result["pivots"]) > 0
    assert result["max_param_diff_between_ranks"] == 0.0
    assert result["max_diff_to_single_process_step"] < 1e-6
