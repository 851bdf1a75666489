"""HF rollout engine, LLMBackend, trainer (checkpoint/resume) and CLI of the LLM backend, on
micro Llama models built from a config (no downloads)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deepgrpo import AUX, MAIN, SampleRequest, explore, make_estimator, method_config
from deepgrpo.losses import dual_stream_loss
from llm.backend import LLMBackend, SamplingConfig
from llm.engine import Generation, RolloutEngine
from llm.hf_engine import HFEngine, sample_next
from llm.segmenters import make_segmenter
from llm.tasks import DATA_DIR, load_problems, make_prompts
from llm.testing import memorize, micro_model


@pytest.fixture(scope="module")
def problems():
    return load_problems(DATA_DIR / "arith_sample.jsonl")


@pytest.fixture(scope="module")
def trained(problems):
    """A micro model that half-memorised the sample problems: sampling gives mixed rewards."""
    model, tok = micro_model(seed=0)
    losses = memorize(model, tok, problems, steps=80)
    assert losses[-1] < 0.5 * losses[0]
    return model, tok


@pytest.fixture(scope="module")
def model_dir(trained, tmp_path_factory):
    """The trained micro model, with an evaluation file disjoint from the sample problems beside
    it (``heldout.jsonl``: a run never trains on a question of its --eval-data)."""
    from llm.models import save_pretrained_dir
    from llm.testing import write_arith_heldout
    model, tok = trained
    base = tmp_path_factory.mktemp("micro")
    write_arith_heldout(base / "heldout.jsonl")
    return save_pretrained_dir(model, tok, base / "model")


def _heldout(model_dir) -> str:
    return str(Path(model_dir).parent / "heldout.jsonl")


def make_backend(model, tok, temperature=1.0, max_tokens=40, reward_fn=None, seed=0):
    from llm.models import frozen_copy
    engine = HFEngine(model, [tok.eos_token_id], tok.pad_token_id)
    return LLMBackend(model, frozen_copy(model), tok, engine, make_segmenter("step", tok),
                      SamplingConfig(max_response_tokens=max_tokens, temperature=temperature), seed=seed,
                      reward_fn=reward_fn)


def teacher_forced_logprobs(model, ids: list[int], start: int, temperature: float = 1.0) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= start, from one plain forward pass (no cache, no padding)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()  # [L, V]
    logp = torch.log_softmax(logits / temperature, -1)
    t = torch.arange(start, len(ids))
    return logp[t - 1, torch.tensor(ids)[t]]


# -- engine -------------------------------------------------------------------------------------

def test_engine_implements_protocol(trained):
    model, tok = trained
    assert isinstance(HFEngine(model, [tok.eos_token_id], tok.pad_token_id), RolloutEngine)


def test_continuations_are_exactly_prefix_plus_suffix(trained, problems):
    """The engine conditions on the exact prefix ids: its log-probs of the suffix equal a plain
    forward pass over prompt + prefix + suffix, and greedy continuation of a greedy prefix
    reproduces the greedy response."""
    model, tok = trained
    engine = HFEngine(model, [tok.eos_token_id], tok.pad_token_id)
    prompts = make_prompts(problems, tok)
    greedy = engine.generate([list(p.ids) for p in prompts], 1, max_new_tokens=40, temperature=0.0)
    cut = [len(g.token_ids) // 2 for g in greedy]
    prefixes = [g.token_ids[:c] for g, c in zip(greedy, cut)]
    cont = engine.generate([list(p.ids) for p in prompts], 1, max_new_tokens=[40 - c for c in cut],
                           temperature=0.0, prefixes=prefixes)
    for g, pf, c in zip(greedy, prefixes, cont):
        assert pf + c.token_ids == g.token_ids
        assert c.finished == g.finished
    # sampled continuations of arbitrary (even unlikely) prefixes
    odd = [[int(t) for t in torch.randint(4, 18, (k,), generator=torch.Generator().manual_seed(k))]
           for k in range(1, 9)]
    samples = engine.generate([list(p.ids) for p in prompts], 3, max_new_tokens=20, temperature=1.0,
                              prefixes=odd, seed=7)
    assert len(samples) == 24
    for j, s in enumerate(samples):
        i = j // 3
        full = list(prompts[i].ids) + odd[i] + s.token_ids
        ref = teacher_forced_logprobs(model, full, len(prompts[i].ids) + len(odd[i]))
        assert torch.allclose(torch.tensor(s.logprobs), ref, atol=1e-4), (j, s.logprobs, ref)


def test_engine_lengths_stops_and_seeds(trained, problems):
    model, tok = trained
    engine = HFEngine(model, [tok.eos_token_id], tok.pad_token_id)
    ids = [list(p.ids) for p in make_prompts(problems, tok)]
    out = engine.generate(ids, [2, 0, 1, 3, 1, 1, 1, 4], max_new_tokens=12, temperature=1.0, seed=3)
    assert len(out) == 13
    for g in out:
        assert isinstance(g, Generation) and g.finished != g.truncated
        assert len(g.token_ids) <= 12 and len(g.logprobs) == len(g.token_ids)
        assert all(lp <= 0 for lp in g.logprobs)
        eos = [k for k, t in enumerate(g.token_ids) if t == tok.eos_token_id]
        assert eos == ([len(g.token_ids) - 1] if g.finished else [])
        if g.truncated:
            assert len(g.token_ids) == 12
    assert any(g.truncated for g in out) and any(g.finished for g in out)
    again = engine.generate(ids, [2, 0, 1, 3, 1, 1, 1, 4], max_new_tokens=12, temperature=1.0, seed=3)
    assert [g.token_ids for g in again] == [g.token_ids for g in out]
    other = engine.generate(ids, [2, 0, 1, 3, 1, 1, 1, 4], max_new_tokens=12, temperature=1.0, seed=4)
    assert [g.token_ids for g in other] != [g.token_ids for g in out]
    zero = engine.generate(ids[:2], 2, max_new_tokens=0)
    assert all(g.token_ids == [] and g.truncated for g in zero)
    with pytest.raises(ValueError, match="n has"):
        engine.generate(ids, [1, 2], max_new_tokens=4)


def test_sample_next_temperature_and_top_p():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 6) * 2
    logits[0] = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, -2.0])
    tok, lp = sample_next(logits, 0.5, 1.0, g)
    assert torch.allclose(lp, torch.log_softmax(logits / 0.5, -1).gather(1, tok[:, None]).squeeze(1))
    tok, lp = sample_next(logits, 1.0, 0.7, g)
    probs = torch.softmax(logits, -1)
    sp, order = probs.sort(-1, descending=True)
    keep_sorted = (sp.cumsum(-1) - sp) < 0.7  # smallest top set reaching 0.7
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    assert keep.gather(1, tok[:, None]).all()  # every draw is inside the nucleus
    nucleus = (probs * keep).sum(-1)
    assert torch.allclose(lp.exp(), probs.gather(1, tok[:, None]).squeeze(1) / nucleus, atol=1e-6)
    gtok, glp = sample_next(logits, 0.0, 1.0, None)
    assert torch.equal(gtok, logits.argmax(-1))
    # empirical frequencies of row-0's distribution at T = 1 (4000 draws of one row)
    draws, _ = sample_next(logits[:1].expand(4000, 6), 1.0, 1.0, torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=6).float() / 4000
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.03)


def test_sample_next_entropy_is_that_of_the_sampling_distribution():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 7) * 2

    def entropy(logp):
        return -(logp.exp() * torch.nan_to_num(logp, neginf=0.0)).sum(-1)

    for temperature, top_p in ((1.0, 1.0), (0.6, 1.0), (1.0, 0.8), (0.0, 1.0)):
        tok, lp, ent = sample_next(logits, temperature, top_p, torch.Generator().manual_seed(3), with_entropy=True)
        tok2, lp2 = sample_next(logits, temperature, top_p, torch.Generator().manual_seed(3))
        assert torch.equal(tok, tok2) and torch.equal(lp, lp2)  # the draws do not depend on it
        base = torch.log_softmax(logits / (temperature or 1.0), -1)
        if top_p < 1:
            sp, order = base.exp().sort(-1, descending=True)
            keep = torch.zeros_like(sp, dtype=torch.bool).scatter(1, order, (sp.cumsum(-1) - sp) < top_p)
            base = torch.log_softmax(base.masked_fill(~keep, float("-inf")), -1)
        assert torch.allclose(ent, entropy(base), atol=1e-5), (temperature, top_p)
    assert sample_next(logits, 1.0, 1.0, g)[0].shape == (50,)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_main_rollouts_carry_the_policys_next_token_entropy(trained, problems, temperature):
    """cand_next_entropy[b, t] of a main chain equals the entropy of softmax(logits / T) of a
    plain forward pass over prompt + the first t response tokens (0 from the row's end on); the
    candidates' next_entropy is its value at their prefix lengths; branches do not carry it."""
    model, tok = trained
    be = make_backend(model, tok, temperature=temperature)
    prompts = make_prompts(problems, tok)
    ro = be.sample([SampleRequest(p, None, 2) for p in prompts])
    ent = ro.extras["cand_next_entropy"]
    assert ent.shape == (len(ro), ro.tokens.shape[1] + 1) and ent.dtype == torch.float64
    for b in range(len(ro)):
        S = int(ro.lengths[b])
        ids = list(prompts[b // 2].ids) + ro.tokens[b, :S].tolist()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()  # [L, V]
        logp = torch.log_softmax(logits / temperature, -1)[len(prompts[b // 2].ids) - 1:len(ids) - 1]  # [S, V]
        want = -(logp.exp() * logp).sum(-1)
        assert torch.allclose(ent[b, :S].float(), want, atol=1e-4), b
        assert (ent[b, S:] == 0).all()
    branch = be.sample([SampleRequest(prompts[0], ro.tokens[0, :3], 2)])
    assert "cand_next_entropy" not in branch.extras
    # through the core: the candidates' feature, and the learned informative selector learns from it
    res, est = _selector_step(be, prompts)
    assert est.state_dict()["trials"].tolist() == res.plan.n.astype(float).tolist()


def _sample_next_before_sharing(logits, temperature, top_p, generator):
    """sample_next as it was before the sampling distribution moved to llm.engine.sampling_log_probs
    (frozen copy): tokens, log-probs and entropy."""
    logits = logits.float()
    if temperature == 0:
        logp = torch.log_softmax(logits, -1)
        tok = logp.argmax(-1)
    else:
        logp = torch.log_softmax(logits / temperature, -1)
        if top_p < 1.0:
            sorted_lp, order = logp.sort(-1, descending=True)
            mass_before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()
            drop = torch.zeros_like(mass_before >= top_p).scatter(1, order, mass_before >= top_p)
            logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), -1)
        tok = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
    ent = -torch.where(torch.isfinite(logp), logp.exp() * logp, torch.zeros_like(logp)).sum(-1)
    return tok, logp.gather(1, tok[:, None]).squeeze(1), ent


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (0.7, 0.9), (1.3, 0.5), (0.0, 1.0),
                                               (0.0, 0.8)])
def test_sample_next_draws_the_same_bits_through_the_shared_sampling_distribution(temperature, top_p):
    """sample_next calls llm.engine.sampling_log_probs (shared with the backend's next_entropy):
    tokens, log-probs and entropies are bit for bit those of the formula it had before."""
    from llm.engine import distribution_entropy, sampling_log_probs
    logits = torch.randn(300, 40, generator=torch.Generator().manual_seed(7)) * 3
    for seed in (0, 1):
        tok, lp, ent = sample_next(logits, temperature, top_p, torch.Generator().manual_seed(seed), with_entropy=True)
        tok0, lp0, ent0 = _sample_next_before_sharing(logits, temperature, top_p, torch.Generator().manual_seed(seed))
        assert torch.equal(tok, tok0) and torch.equal(lp, lp0) and torch.equal(ent, ent0)
    # the shared function on any leading shape: the same rows as on [B, V]
    lp3 = sampling_log_probs(logits.reshape(30, 10, 40), temperature, top_p)
    assert torch.equal(lp3.reshape(300, 40), sampling_log_probs(logits, temperature, top_p))
    assert torch.equal(distribution_entropy(lp3).reshape(300), ent0)


def _backend(model, tok, temperature, top_p, report_entropies=True, entropy_feature=False, chunk=64):
    engine = HFEngine(model, [tok.eos_token_id], tok.pad_token_id, report_entropies=report_entropies)
    return LLMBackend(model, None, tok, engine, make_segmenter("step", tok),
                      SamplingConfig(max_response_tokens=40, temperature=temperature, top_p=top_p), seed=0,
                      logprob_chunk_size=chunk, entropy_feature=entropy_feature)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_next_entropy_by_a_forward_pass_equals_the_engines_reported_entropy(trained, problems, temperature, top_p):
    """An engine that reports no entropies (HFEngine(report_entropies=False), as vLLM) with
    entropy_feature=True: cand_next_entropy comes from one forward pass of the policy over the
    main rows (chunks of 3 rows here) and equals the HF engine's own reported entropies; without
    entropy_feature the rollouts lack it; branches never carry it; the policy's mode is kept."""
    model, tok = trained
    prompts = make_prompts(problems, tok)
    requests = [SampleRequest(p, None, 2) for p in prompts]
    reported = _backend(model, tok, temperature, top_p).sample(requests)
    silent = _backend(model, tok, temperature, top_p, report_entropies=False, entropy_feature=True, chunk=3)
    model.train()
    computed = silent.sample(requests)
    assert model.training
    model.eval()
    assert torch.equal(computed.tokens, reported.tokens) and torch.equal(computed.logprobs, reported.logprobs)
    want, got = reported.extras["cand_next_entropy"], computed.extras["cand_next_entropy"]
    assert got.shape == want.shape == (len(reported), reported.tokens.shape[1] + 1) and got.dtype == torch.float64
    assert float((got - want).abs().max()) < 1e-5
    assert float(want.max()) > 0.1 and torch.equal(got == 0, want == 0)  # zero exactly at and after each end
    off = _backend(model, tok, temperature, top_p, report_entropies=False).sample(requests)
    assert torch.equal(off.tokens, reported.tokens) and "cand_next_entropy" not in off.extras
    branch = silent.sample([SampleRequest(prompts[0], reported.tokens[0, :3], 2)])
    assert "cand_next_entropy" not in branch.extras
    # through the core: the learned informative selector reads the computed feature
    _selector_step(silent, prompts)


def test_trainer_asks_for_next_entropy_only_when_its_estimator_uses_it(model_dir, tmp_path):
    from llm.backend import uses_next_entropy
    from llm.trainer import Trainer
    sel = Trainer(_train_config(model_dir, method="learned-informative", steps=1, eval_every=0), tmp_path / "sel",
                  progress=False)
    assert sel.backend.entropy_feature and uses_next_entropy(sel.estimator)
    deep = Trainer(_train_config(model_dir, steps=1, eval_every=0), tmp_path / "deep", progress=False)
    assert not deep.backend.entropy_feature and not uses_next_entropy(deep.estimator)


# -- backend ------------------------------------------------------------------------------------

def test_backend_rollouts_rewards_and_segments(trained, problems):
    model, tok = trained
    be = make_backend(model, tok)
    prompts = make_prompts(problems, tok)
    sol = tok(problems[3].solution, add_special_tokens=False)["input_ids"]
    prefix = torch.tensor(sol[:6])
    ro = be.sample([SampleRequest(prompts[3], prefix, 5), SampleRequest(prompts[0], None, 3)])
    assert len(ro) == 8 and ro.tokens.shape == ro.logprobs.shape == ro.mask.shape
    for b in range(8):
        pf = prefix.tolist() if b < 5 else []
        suffix = ro.tokens[b, :int(ro.lengths[b])].tolist()
        full = pf + suffix
        assert int(ro.segment_ends[b][-1]) == len(full)  # full-response coordinates
        text = tok.decode(full, skip_special_tokens=True)
        problem = problems[3] if b < 5 else problems[0]
        expect = 0.0 if bool(ro.truncated[b]) else float(text.rsplit(";", 1)[-1] == problem.answer and ";" in text)
        assert float(ro.rewards[b]) == expect
    # the correct full solution as a prefix: every row that just stops scores 1, the others by their text
    ro = be.sample([SampleRequest(prompts[3], torch.tensor(sol), 6)])
    stops = 0
    for b in range(6):
        suffix = ro.tokens[b, :int(ro.lengths[b])].tolist()
        if suffix == [tok.eos_token_id]:
            stops += 1
            assert float(ro.rewards[b]) == 1.0 and int(ro.segment_ends[b][-1]) == len(sol) + 1
    assert stops > 0


def _explore_batch(trained, problems, temperature=1.0, method="deep-grpo"):
    model, tok = trained
    be = make_backend(model, tok, temperature=temperature)
    cfg = method_config(method, G=4, K=4)
    res = explore(be, make_prompts(problems, tok), cfg, make_estimator(cfg.estimator), np.random.default_rng(0))
    return be, cfg, res


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trainer_logprobs_match_rollout_logprobs(trained, problems, temperature):
    be, cfg, res = _explore_batch(trained, problems, temperature)
    batch = res.batch
    assert (batch.stream == AUX).any() and (batch.stream == MAIN).any()
    with torch.no_grad():
        lp = be.logprobs(batch, "policy")
    m = batch.response_mask
    diff = (lp - batch.old_logprobs).abs()[m]
    assert float(diff.max()) < 1e-4
    assert be.diagnostics()["logprob_mismatch"] < 1e-5
    ref = be.logprobs(batch, "reference")
    assert not ref.requires_grad and torch.allclose(ref[m], lp[m], atol=1e-4)  # reference = initial policy
    # aux rows: prefix tokens are the parent's, and the suffix log-probs were computed on that prefix
    parent = batch.extras["parent"]
    for r in torch.nonzero(batch.stream == AUX).flatten().tolist():
        P = int(batch.prefix_len[r])
        main_row = res.main.tokens[int(parent[r])]
        assert torch.equal(batch.tokens[r, :P], main_row[:P])


def test_aux_prefix_tokens_get_zero_gradient(trained, problems):
    be, cfg, res = _explore_batch(trained, problems)
    batch = res.batch
    lp = be.logprobs(batch, "policy")
    lp.retain_grad()
    ref = be.logprobs(batch, "reference")
    out = dual_stream_loss(batch, lp, ref, cfg.loss)
    out.loss.backward()
    grad = lp.grad
    aux = torch.nonzero(batch.stream == AUX).flatten()
    assert len(aux) > 0 and int(batch.prefix_len[aux].max()) > 0
    pos = torch.arange(batch.tokens.shape[1])
    for r in aux.tolist():
        P = int(batch.prefix_len[r])
        assert torch.all(grad[r, :P] == 0)
        suffix = (pos >= P) & batch.response_mask[r]
        assert torch.all(grad[r, suffix] != 0)
    assert torch.all(grad[~batch.response_mask] == 0)
    params = [p for p in be.policy.parameters()]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    be.policy.zero_grad(set_to_none=True)


# -- trainer ------------------------------------------------------------------------------------

def _train_config(model_dir, **kw):
    from llm.evaluate import EvalConfig
    from llm.trainer import TrainConfig
    base = dict(model=str(model_dir), data=str(DATA_DIR / "arith_sample.jsonl"),
                eval_data=_heldout(model_dir), method="deep-grpo",
                overrides={"G": 4, "K": 4}, prompts_per_step=4, steps=4, lr=3e-3, checkpoint_every=2,
                sampling=SamplingConfig(max_response_tokens=40),
                eval=EvalConfig(n_problems=8, samples=2, pass_k=2, max_response_tokens=40),
                eval_every=2, threads=1, tensorboard=False, seed=5)
    base.update(kw)
    return TrainConfig(**base)


VOLATILE = ("time_explore_s", "time_update_s", "wall_time_s")


def _stable(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def test_resume_equals_uninterrupted(model_dir, tmp_path):
    from llm.trainer import Trainer
    cfg = _train_config(model_dir)
    full = Trainer(cfg, tmp_path / "a", progress=False)
    full.run()
    rows_a = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_a] == [0, 1, 2, 3, 4]
    killed = Trainer(cfg, tmp_path / "b", progress=False)
    killed.run(until=3)  # checkpoint at step 2; step 3 is lost as if the process died
    assert (tmp_path / "b" / "checkpoint" / "trainer_state.pt").is_file()
    assert not (tmp_path / "b" / "summary.json").exists()
    resumed = Trainer(cfg, tmp_path / "b", resume=True, progress=False)
    assert resumed.step == 2 and resumed.data_pos == 2 * cfg.prompts_per_step
    resumed.run()
    rows_b = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert _stable(rows_b) == _stable(rows_a)
    for a, b in zip(full.policy.parameters(), resumed.policy.parameters()):
        assert torch.equal(a, b)
    # the policy actually moved and the checkpoint is a normal transformers directory
    from llm.models import load_causal_lm
    ck = load_causal_lm(tmp_path / "a" / "checkpoint")
    init = load_causal_lm(model_dir)
    assert any(not torch.equal(p, q) for p, q in zip(ck.parameters(), init.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(ck.parameters(), full.policy.parameters()))


def test_trainer_metrics_budget_and_outputs(model_dir, tmp_path):
    from llm.trainer import Trainer
    cfg = _train_config(model_dir, steps=2, eval_every=0, tensorboard=True)
    summary = Trainer(cfg, tmp_path / "deep", progress=False).run()
    rows = [json.loads(line) for line in (tmp_path / "deep" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    from deepgrpo.step import STEP_COLUMNS
    for key in (*STEP_COLUMNS, "pass@4", "entropy", "logprob_mismatch", "est_rel_depth", "est_intercept",
                "eval/greedy_mean@1", "eval/sampled_mean@1", "eval/pass@2"):
        assert key in last, key
    assert last["logprob_mismatch"] < 1e-5 and last["entropy"] > 0
    assert last["rollouts_main"] == 2 * 4 * 4
    assert last["rollouts_aux"] == sum(r["step_rollouts_aux"] for r in rows[1:]) > 0
    assert summary["budget"]["rollouts"] == last["rollouts"]
    assert 0 < last["pivot_depth_mean"] < 1
    assert set(summary["before"]) >= {"greedy_mean@1", "sampled_mean@1", "pass@2"}
    assert list((tmp_path / "deep" / "tb").glob("events.out.tfevents.*"))
    written = json.loads((tmp_path / "deep" / "config.json").read_text())
    assert written["train"]["method"] == "deep-grpo" and written["algo"]["explore"]["K"] == 4
    # GRPO through the same trainer: no aux stream
    g = Trainer(_train_config(model_dir, method="grpo", steps=1, eval_every=0), tmp_path / "grpo", progress=False).run()
    assert g["budget"]["rollouts_aux"] == 0 and g["budget"]["rollouts_main"] == 16


# -- command line -------------------------------------------------------------------------------

def _cli(args, capsys):
    """Run ``deepgrpo llm ARGS``; returns (exit code, captured output)."""
    from deepgrpo.cli import main
    try:
        code = main(["llm", *args])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr()


def test_cli_rejects_bad_input_with_one_line_and_writes_nothing(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    cases = [
        (["train", "--model", str(tmp_path / "nope"), "--out", str(out)], "--model"),
        (["train", "--model", str(model_dir), "--method", "bogus", "--out", str(out)], "--method"),
        (["train", "--model", str(model_dir), "--steps", "0", "--out", str(out)], "--steps"),
        (["train", "--model", str(model_dir), "--steps", "many", "--out", str(out)], "--steps"),
        (["train", "--model", str(model_dir), "--data", str(tmp_path / "missing.jsonl"), "--out", str(out)], "--data"),
        (["train", "--model", str(model_dir), "--set", "gamma=-1", "--out", str(out)], "gamma"),
        (["train", "--model", str(model_dir), "--set", "nonsense=1", "--out", str(out)], "nonsense"),
        (["train", "--model", str(model_dir), "--lr", "-1", "--out", str(out)], "--lr"),
        (["train", "--out", str(out)], "--model"),
        (["eval", "--model", str(tmp_path / "nope")], "--model"),
        (["eval", "--model", str(model_dir), "--data", "nofile.jsonl"], "--data"),
        (["eval", "--model", str(model_dir), "--eval-samples", "2", "--eval-pass-k", "3"], "--eval-pass-k"),
        (["sft", "--out", str(out), "--steps", "-3"], "--steps"),
    ]
    for args, option in cases:
        code, cap = _cli(args, capsys)
        assert code == 2, args
        err = cap.err.strip().splitlines()
        assert len(err) == 1 and option in err[0], (args, cap.err)
        assert not out.exists(), args


def test_cli_eval_writes_results(model_dir, tmp_path, capsys):
    out = tmp_path / "ev.json"
    code, cap = _cli(["eval", "--model", str(model_dir), "--data", str(DATA_DIR / "arith_sample.jsonl"),
                      "--eval-samples", "4", "--eval-pass-k", "2", "--eval-max-response-tokens", "40", "--threads", "1",
                      "--out", str(out)],
                     capsys)
    assert code == 0
    res = json.loads(out.read_text())
    printed = json.loads(cap.out.strip().splitlines()[-1])
    assert printed["greedy_mean@1"] == res["greedy_mean@1"] and res["n_problems"] == 8
    assert 0 <= res["sampled_mean@1"] <= res["pass@2"] <= 1


def test_light_modules_do_not_import_transformers():
    code = ("import sys, deepgrpo.cli, llm, llm.engine, llm.rewards, llm.tasks, llm.segmenters, llm.cli; "
            "assert 'transformers' not in sys.modules, 'transformers imported'; "
            "assert 'datasets' not in sys.modules and 'math_verify' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name,task,segmenter", [("gsm8k_sample.jsonl", "gsm8k", "line"),
                                                 ("math_sample.jsonl", "math", "sentence")])
def test_trainer_runs_on_gsm8k_and_math_files(tmp_path, name, task, segmenter):
    """The file-data path end to end (task detection, prompt template, segmenter, reward rule);
    the micro model cannot solve these, so the rewards are 0 and the batch is empty. Their
    prompts (up to 184 characters) need a context longer than the micro model's 96 tokens."""
    import dataclasses

    from llm.testing import MICRO, save_micro_model
    from llm.trainer import Trainer
    model_dir = save_micro_model(tmp_path / "model", config=dataclasses.replace(MICRO, max_position_embeddings=256))
    cfg = _train_config(model_dir, data=str(DATA_DIR / name), eval_data=None, method="grpo", steps=1,
                        prompts_per_step=2, overrides={"G": 2}, eval_every=0)
    tr = Trainer(cfg, tmp_path / task, progress=False)
    assert tr.task == task and type(tr.segmenter).__name__ == "TextBoundarySegmenter"
    assert tr.segmenter.regex.pattern == make_segmenter(segmenter, tr.tokenizer).regex.pattern
    summary = tr.run()
    assert summary["budget"]["rollouts_main"] == 4 and summary["after"]["greedy_mean@1"] == 0.0
    held_ids = {p.problem.id for p in tr.heldout}
    train_ids = {tr.stream.problem_at(i).id for i in range(20)}
    assert held_ids and not held_ids & train_ids  # held-out split is disjoint from training


def test_cli_layering_config_file_then_flags_then_set(model_dir, tmp_path):
    """``llm train --config FILE --lr X``: the flag applies over the file (it used to be ignored),
    and --set over both; the recipe's ``overrides`` land in the algorithm."""
    from llm.cli import build_parser, resolve_train
    cfg = tmp_path / "recipe.json"
    cfg.write_text(json.dumps({"description": "test", "train": {"model": str(model_dir), "lr": 1e-6, "steps": 9,
                                                                  "overrides": {"G": 4, "lam": 0.5}}}))
    a = build_parser("deepgrpo llm").parse_args(["train", "--config", str(cfg), "--lr", "1e-5", "--set", "K=2",
                                                 "--set", "loss.lam=0.25", "--out", str(tmp_path / "o")])
    t = resolve_train(a)
    algo = t.algo()
    assert t.lr == 1e-5 and t.steps == 9
    assert (algo.explore.G, algo.explore.K, algo.loss.lam) == (4, 2, 0.25)
    assert t.overrides == {"explore.G": 4, "explore.K": 2, "loss.lam": 0.25}


def test_cli_resume_applies_steps_and_refuses_other_changes(model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    base = ["train", "--model", str(model_dir), "--data", str(DATA_DIR / "arith_sample.jsonl"),
            "--eval-data", _heldout(model_dir), "--method", "grpo", "--G", "2",
            "--prompts-per-step", "2", "--eval-problems", "2", "--eval-samples", "0", "--max-response-tokens", "30",
            "--threads", "1", "--no-tensorboard", "--checkpoint-every", "1"]
    code, cap = _cli([*base, "--steps", "2", "--out", str(out)], capsys)
    assert code == 0, cap.err
    written = json.loads((out / "config.json").read_text())
    assert Path(written["train"]["model"]).is_absolute()  # resumable from any directory
    monkeypatch.chdir(tmp_path)
    for extra, option in ((["--lr", "1"], "lr"), (["--G", "4"], "explore.G"), (["--steps", "1"], "steps")):
        code, cap = _cli(["train", "--resume", "--out", str(out), *extra], capsys)
        err = cap.err.strip().splitlines()
        assert code == 2 and len(err) == 1 and option in err[0], (extra, cap.err)
    assert json.loads((out / "config.json").read_text()) == written  # nothing rewritten
    code, cap = _cli(["train", "--resume", "--out", str(out), "--steps", "3"], capsys)
    assert code == 0, cap.err
    rec = json.loads((out / "config.json").read_text())
    assert rec["train"]["steps"] == 3 and rec["resumes"] == [{"at_step": 2, "changed": {"steps": 3}}]
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    # the README's `llm eval --model RUN_DIR`: a run directory's config.json is the run's, its model
    # is in checkpoint/ (this used to crash on the run's config.json)
    code, cap = _cli(["eval", "--model", str(out), "--eval-problems", "2", "--eval-samples", "0", "--threads", "1",
                      "--out", str(tmp_path / "ev.json")], capsys)
    assert code == 0, cap.err
    assert json.loads((tmp_path / "ev.json").read_text())["checkpoint"] == str(out / "checkpoint")


def test_simulator_and_llm_records_share_the_cores_columns(model_dir, tmp_path):
    """Both backends write the core's step record (deepgrpo.step) under the same names, so the
    studies read runs of either; each adds only its own columns."""
    from deepgrpo.step import STEP_COLUMNS
    from llm.trainer import Trainer
    from sims.runner import RunnerConfig, train
    from sims.spec import TokenTreeSpec
    Trainer(_train_config(model_dir, steps=2, eval_every=0), tmp_path / "llm", progress=False).run()
    llm_rows = [json.loads(line) for line in (tmp_path / "llm" / "metrics.jsonl").read_text().splitlines()]
    sim_rows = train(TokenTreeSpec(n_problems=4, depth=6), method_config("deep-grpo"),
                     RunnerConfig(steps=2, batch_problems=4)).history
    llm_cols, sim_cols = set(llm_rows[-1]), set(sim_rows[-1])
    core = set(STEP_COLUMNS) | {"est_rel_depth", "est_intercept"}
    assert core <= llm_cols and core <= sim_cols
    assert not {c for c in llm_cols ^ sim_cols if c in core}
    # budget columns mean the same thing in both: cumulative = sum of the per-step counts
    for rows in (llm_rows[1:], sim_rows[1:]):
        for stream in ("main", "aux"):
            assert rows[-1][f"tokens_{stream}"] == sum(r[f"step_tokens_{stream}"] for r in rows)
        assert rows[-1]["rollouts"] == rows[-1]["rollouts_main"] + rows[-1]["rollouts_aux"]


def test_trainer_stops_at_a_token_budget_within_one_step(model_dir, tmp_path):
    from llm.trainer import Trainer
    cfg = _train_config(model_dir, method="grpo", steps=50, budget=500, budget_unit="tokens", eval_every=0,
                        overrides={"G": 2}, prompts_per_step=2)
    summary = Trainer(cfg, tmp_path / "b", progress=False).run()
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    last, before = rows[-1]["tokens"], rows[-2]["tokens"] if len(rows) > 2 else 0
    assert before < 500 <= last and summary["steps"] == len(rows) - 1 < 50
    assert "eval/greedy_mean@1" in rows[-1]  # the final evaluation ran at the budget's step
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["budget"]["tokens"] == last


def _selector_step(backend, prompts):
    """One ``learned-informative`` exploration step through the core: its candidates carry the
    main rollouts' ``cand_next_entropy`` at their prefix lengths, and the selector learns from the
    step's pivots. Returns the step's result and the estimator."""
    cfg = method_config("learned-informative", G=4, K=4)
    est = make_estimator(cfg.estimator)
    res = explore(backend, prompts, cfg, est, np.random.default_rng(0))
    c = res.candidates
    assert len(c) and np.array_equal(c.features["next_entropy"],
                                     res.main.extras["cand_next_entropy"].numpy()[c.traj, c.prefix_len])
    assert est.buffer_len == len(res.plan) > 0
    return res, est
