"""HF engine prefix sharing: rows with the same prompt + prefix are prefilled once and their KV
cache is copied, and the cache reserves room instead of growing by concatenation. Sampling must
be unchanged: exact log-probs, the same next-token distribution as a fresh prefill, the same
tokens for the same seed, rows finishing at different times."""

from __future__ import annotations

import pytest
import torch

from llm.hf_engine import HFEngine, reserved_cache
from llm.tasks import DATA_DIR, load_problems, make_prompts
from llm.testing import memorize, micro_model


@pytest.fixture(scope="module")
def problems():
    return load_problems(DATA_DIR / "arith_sample.jsonl")


@pytest.fixture(scope="module")
def trained(problems):
    """A micro model that half-memorised the sample problems (mixed lengths, EOS at varied times)."""
    model, tok = micro_model(seed=1)
    memorize(model, tok, problems, steps=60)
    return model.eval(), tok


def teacher_forced(model, ids: list[int], start: int) -> torch.Tensor:
    """``[len(ids) - start]`` log p(ids[t] | ids[:t]) from one plain forward pass (no cache, no padding)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()  # [L, V]
    t = torch.arange(start, len(ids))
    return torch.log_softmax(logits, -1)[t - 1, torch.tensor(ids)[t]]


def test_shared_prefix_branches_have_exact_logprobs_and_finish_independently(trained, problems):
    """K branches per pivot from shared prefixes (repeated requests not adjacent, different prefix
    lengths): every returned log-prob equals the teacher-forced log-prob of the model to 1e-5,
    and rows of one request stop at different steps."""
    model, tok = trained
    engine = HFEngine(model, [tok.eos_token_id], tok.pad_token_id, prune_fraction=0.1)
    prompts = [list(p.ids) for p in make_prompts(problems, tok)]
    sol = [tok(p.solution, add_special_tokens=False)["input_ids"] for p in problems]
    requests = [(0, 0), (1, 5), (0, 0), (2, 11), (1, 5), (3, 2)]  # (problem, prefix length); repeats on purpose
    gens = engine.generate([prompts[i] for i, _ in requests], 6, max_new_tokens=30,
                           prefixes=[sol[i][:k] for i, k in requests], seed=5)
    assert len(gens) == 36
    for j, g in enumerate(gens):
        i, k = requests[j // 6]
        ctx = prompts[i] + sol[i][:k]
        ref = teacher_forced(model, ctx + g.token_ids, len(ctx))
        assert torch.allclose(torch.tensor(g.logprobs), ref, atol=1e-5), (j, g.logprobs, ref)
        assert g.finished != g.truncated
        assert g.finished == (bool(g.token_ids) and g.token_ids[-1] == tok.eos_token_id)
    lengths = {len(g.token_ids) for g in gens}
    assert len(lengths) >= 3  # rows finished at different times (and were pruned on the way)


def test_shared_prefill_equals_a_fresh_prefill_per_row(trained, problems):
    """The expanded cache of a shared prefill gives each row the next-token logits of a plain
    forward pass over its own context, and the same logits at later decoding steps."""
    model, tok = trained
    engine = HFEngine(model, [tok.eos_token_id], tok.pad_token_id)
    prompts = [list(p.ids) for p in make_prompts(problems, tok)]
    contexts = [prompts[2], prompts[0] + [5, 6], prompts[2], prompts[0] + [5, 6], prompts[2], prompts[5]]
    with torch.no_grad():
        cache, logits, attn, next_pos = engine._prefill_shared(contexts, steps=4)
        assert logits.shape == (6, model.config.vocab_size) and attn.shape[0] == 6
        for b, ctx in enumerate(contexts):
            fresh = model(input_ids=torch.tensor([ctx])).logits[0, -1]  # [V]
            assert torch.allclose(logits[b], fresh, atol=1e-5)
            assert int(next_pos[b]) == len(ctx)
        # one decoding step with a different token per row through the shared cache
        nxt = torch.tensor([7, 8, 9, 10, 11, 12])
        attn = torch.cat([attn, torch.ones(6, 1, dtype=attn.dtype)], 1)
        out = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                    use_cache=True, **{engine._cache_name(): cache})
        for b, ctx in enumerate(contexts):
            fresh = model(input_ids=torch.tensor([ctx + [int(nxt[b])]])).logits[0, -1]
            assert torch.allclose(out.logits[b, -1], fresh, atol=1e-5)


def test_branches_sample_the_fresh_first_token_distribution(trained, problems):
    """Empirical first-token frequencies of 3000 branches from one shared prefix match the
    softmax of a fresh forward pass (within binomial sampling error), as do their log-probs."""
    model, tok = trained
    engine = HFEngine(model, [tok.eos_token_id], tok.pad_token_id)
    ctx_prompt = list(make_prompts(problems, tok)[4].ids)
    prefix = tok(problems[4].solution, add_special_tokens=False)["input_ids"][:3]
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([ctx_prompt + prefix])).logits[0, -1].float(), -1)
    n = 3000
    gens = engine.generate([ctx_prompt], n, prefixes=[prefix], max_new_tokens=1, seed=11)
    first = torch.tensor([g.token_ids[0] for g in gens])
    freq = torch.bincount(first, minlength=probs.numel()).float() / n
    tol = 4 * (probs * (1 - probs) / n).sqrt() + 1e-3  # 4 binomial sd per token
    assert (freq - probs).abs().le(tol).all(), (freq, probs)
    lp = torch.tensor([g.logprobs[0] for g in gens])
    assert torch.allclose(lp, probs.log()[first], atol=1e-5)


def test_seeds_greedy_and_prefill_is_shared(trained, problems):
    """Same seed -> same tokens; greedy branches from one prefix are identical and continue the
    greedy response; K branches from one pivot run the prompt + prefix through the model once."""
    model, tok = trained
    engine = HFEngine(model, [tok.eos_token_id], tok.pad_token_id)
    prompts = [list(p.ids) for p in make_prompts(problems, tok)]
    a = engine.generate(prompts[:3], 4, max_new_tokens=20, seed=9)
    b = engine.generate(prompts[:3], 4, max_new_tokens=20, seed=9)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.logprobs for g in a] == [g.logprobs for g in b]
    greedy = engine.generate(prompts[:1], 1, max_new_tokens=30, temperature=0.0)[0].token_ids
    cut = len(greedy) // 2
    branches = engine.generate(prompts[:1], 3, max_new_tokens=30 - cut, temperature=0.0, prefixes=[greedy[:cut]])
    assert all(greedy[:cut] + g.token_ids == greedy for g in branches)

    prefill_rows = []

    def record_prefill(module, args, kwargs):
        if kwargs["input_ids"].shape[1] > 1:  # decoding steps feed one token per row
            prefill_rows.append(tuple(kwargs["input_ids"].shape))

    hook = model.register_forward_pre_hook(record_prefill, with_kwargs=True)
    try:
        engine.generate([prompts[0], prompts[1]], 8, max_new_tokens=5, prefixes=[greedy[:cut], []], seed=0)
    finally:
        hook.remove()
    Lmax = max(len(prompts[0]) + cut, len(prompts[1]))
    assert prefill_rows == [(2, Lmax)]  # 16 rows, 2 distinct contexts, one prefill of 2 rows


def test_reserved_cache_matches_dynamic_cache_and_falls_back():
    """Decoding with the reserved cache gives the logits of the default cache bit for bit, also
    after rows are dropped; a model with sliding-window layers gets no reserved cache (None)
    and the engine still returns exact log-probs with the model's own cache."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    model, tok = micro_model(seed=3)
    model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 20, (4, 7), generator=g)  # [B, L]
    steps = torch.randint(4, 20, (4, 6), generator=g)  # [B, 6] tokens fed one at a time

    name = HFEngine(model, [tok.eos_token_id], tok.pad_token_id)._cache_name()  # the current API's name (cache)

    def decode(cache):
        out = model(input_ids=ids, use_cache=True, **{name: cache})
        cache, logits, rows = getattr(out, name), [out.logits[:, -1]], torch.arange(4)
        for t in range(6):
            if t == 3:  # drop rows 1 and 3 as the engine does for finished rows
                rows = rows[[0, 2]]
                cache.batch_select_indices(torch.tensor([0, 2]))
            out = model(input_ids=steps[rows, t:t + 1], use_cache=True, position_ids=torch.full((len(rows), 1), 7 + t),
                        **{name: cache})
            cache = getattr(out, name)
            logits.append(out.logits[:, -1])
        return logits

    with torch.no_grad():
        cache = reserved_cache(model, 7 + 6)
        assert cache is not None
        for x, y in zip(decode(None), decode(cache)):
            assert torch.equal(x, y)

    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=96,
                      use_sliding_window=True, sliding_window=8, max_window_layers=0,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    sliding = AutoModelForCausalLM.from_config(cfg).float().eval()
    assert reserved_cache(sliding, 32) is None
    engine = HFEngine(sliding, [tok.eos_token_id], tok.pad_token_id)
    prompt = [1, 5, 6, 7, 8]
    gens = engine.generate([prompt], 3, prefixes=[[9, 10, 11, 12, 13, 14]], max_new_tokens=12, seed=2)
    for gen in gens:
        ref = teacher_forced(sliding, prompt + [9, 10, 11, 12, 13, 14] + gen.token_ids, 11)
        assert torch.allclose(torch.tensor(gen.logprobs), ref, atol=1e-5)
