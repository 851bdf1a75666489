import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepgrpo.batch import AUX, MAIN, Batch
from deepgrpo.config import LossConfig
from deepgrpo.losses import aggregate, clipped_surrogate, dual_stream_loss, kl_penalty, loss_denominators


def make_batch(B=4, T=5, n_aux=2, prefix=2, seed=0, lengths=None):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths) if lengths is not None else torch.randint(2, T + 1, (B,), generator=g)
    resp = torch.arange(T)[None] < lengths[:, None]
    stream = torch.tensor([MAIN] * (B - n_aux) + [AUX] * n_aux)
    prefix_len = torch.where(stream == AUX, prefix, 0)
    trainable = resp & (torch.arange(T)[None] >= prefix_len[:, None])
    return Batch(prompts=[0], prompt_index=torch.zeros(B, dtype=torch.long),
                 tokens=torch.zeros(B, T, dtype=torch.long),
                 old_logprobs=-torch.rand(B, T, generator=g), response_mask=resp, trainable_mask=trainable,
                 stream=stream, group=stream.clone(), pivot_depth=torch.zeros(B), prefix_len=prefix_len,
                 rewards=torch.zeros(B), advantages=torch.randn(B, generator=g), segment_ends=[None] * B)


def test_aggregation_modes_hand_computed():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    assert aggregate(v, m, "token-mean").item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert aggregate(v, m, "seq-mean-token-mean").item() == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate(v, m, "seq-mean-token-sum-norm").item() == pytest.approx(10 / (2 * 3))
    assert aggregate(v, m, "seq-mean-token-sum-norm", norm_length=10).item() == pytest.approx(10 / 20)
    empty = torch.zeros(2, 3, dtype=torch.bool)
    assert aggregate(v, empty, "token-mean").item() == 0.0


def test_surrogate_and_dual_clip_hand_computed():
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 4.0]]))
    old = torch.zeros(1, 4)
    loss, clipped, dual = clipped_surrogate(lp, old, torch.tensor([1.0]))
    # A > 0: -min(ρ, clip(ρ)) = -[1.2, 0.5, 1.1, 1.2]; the dual clip never acts on A > 0
    np.testing.assert_allclose(loss.numpy()[0], [-1.2, -0.5, -1.1, -1.2], rtol=1e-6)
    assert clipped.tolist() == [[True, False, False, True]] and not dual.any()
    loss, clipped, dual = clipped_surrogate(lp, old, torch.tensor([-1.0]), dual_clip=None)
    # A < 0: max(ρ, clip(ρ)) = [1.5, 0.8, 1.1, 4.0]
    np.testing.assert_allclose(loss.numpy()[0], [1.5, 0.8, 1.1, 4.0], rtol=1e-6)
    assert clipped.tolist() == [[False, True, False, False]] and not dual.any()
    # the default dual clip c = 3 caps the last token's loss at -c·A = 3
    loss, clipped, dual = clipped_surrogate(lp, old, torch.tensor([-1.0]))
    np.testing.assert_allclose(loss.numpy()[0], [1.5, 0.8, 1.1, 3.0], rtol=1e-6)
    assert clipped.tolist() == [[False, True, False, False]] and dual.tolist() == [[False, False, False, True]]


def test_reference_defaults_dual_clip_3_and_unweighted_aux_kl():
    cfg = LossConfig()
    assert cfg.dual_clip == 3.0 and cfg.kl_weighted_by_lambda is False
    assert LossConfig(dual_clip=None).dual_clip is None


def test_clip_and_dual_clip_fractions_are_reported_separately():
    # one main row of 4 tokens, A = -1, ratios [1.5, 0.5, 1.1, 4.0]: the ordinary clip acts on
    # 0.5 (clipped up to 0.8), the dual clip on 4.0 (capped at 3)
    b = make_batch(B=1, T=4, n_aux=0, lengths=[4])
    b.advantages = torch.tensor([-1.0])
    lp = b.old_logprobs + torch.log(torch.tensor([[1.5, 0.5, 1.1, 4.0]]))
    out = dual_stream_loss(b, lp, None, LossConfig(kl_coef=0.0))
    assert out.metrics["clip_fraction"] == pytest.approx(0.25)
    assert out.metrics["dual_clip_fraction"] == pytest.approx(0.25)
    assert out.loss.item() == pytest.approx((1.5 + 0.8 + 1.1 + 3.0) / 4, rel=1e-6)


def test_authors_loss_hand_computed_aux_kl_not_weighted_by_lambda():
    # main row: 2 tokens, aux row: prefix 1 + 2 trainable tokens; ratio 1 everywhere
    b = make_batch(B=2, T=3, n_aux=1, prefix=1, lengths=[2, 3])
    b.advantages = torch.tensor([0.5, -1.0])
    lp = b.old_logprobs.clone()
    ref = lp - math.log(2.0)  # log π - log π_ref = log 2: k3 = 1/2 - log(1/2) - 1 per token
    k3 = 0.5 + math.log(2.0) - 1.0
    out = dual_stream_loss(b, lp, ref, LossConfig(lam=0.25, kl_coef=0.1))
    # L = pg_main + λ pg_aux + β (KL_main + KL_aux) = -0.5 + 0.25 * 1.0 + 0.1 * (k3 + k3)
    assert out.pg_main.item() == pytest.approx(-0.5) and out.pg_aux.item() == pytest.approx(1.0)
    assert out.loss.item() == pytest.approx(-0.5 + 0.25 * 1.0 + 0.1 * 2 * k3, rel=1e-6)
    weighted = dual_stream_loss(b, lp, ref, LossConfig(lam=0.25, kl_coef=0.1, kl_weighted_by_lambda=True))
    assert weighted.loss.item() == pytest.approx(-0.5 + 0.25 * 1.0 + 0.1 * (k3 + 0.25 * k3), rel=1e-6)


@pytest.mark.parametrize("gap", [40.0, -40.0])
def test_extreme_log_prob_gaps_and_garbage_padding_give_finite_loss_and_gradient(gap):
    b = make_batch(B=4, T=5, n_aux=2, prefix=1, lengths=[5, 3, 5, 4], seed=2)
    pad = ~b.response_mask
    b.old_logprobs = b.old_logprobs.masked_fill(pad, float("nan"))
    base = b.old_logprobs.nan_to_num(0.0) + gap
    lp = base.masked_fill(pad, float("-inf")).requires_grad_()  # padded positions: -inf
    ref = (b.old_logprobs.nan_to_num(0.0) - gap).masked_fill(pad, float("inf"))
    for dual in (3.0, None):
        lp.grad = None
        out = dual_stream_loss(b, lp, ref, LossConfig(kl_coef=0.5, dual_clip=dual))
        out.loss.backward()
        assert math.isfinite(out.loss.item()) and torch.isfinite(lp.grad).all()
        assert (lp.grad[pad] == 0).all()
        assert all(math.isfinite(v) for v in out.metrics.values())
    # verl's bounds: the log-ratio is clamped at ±20 before exp, the k3 estimate at ±10
    one = torch.tensor([[gap]])
    loss, _, _ = clipped_surrogate(one, torch.zeros(1, 1), torch.tensor([-1.0]), dual_clip=None)
    assert loss.item() == pytest.approx(math.exp(20.0) if gap > 0 else 0.8, rel=1e-5)
    k3 = kl_penalty(one, torch.zeros(1, 1), "k3").item()
    assert k3 == pytest.approx(10.0)


def test_kl_estimators_hand_computed():
    lp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    d = math.log(2.0)
    assert kl_penalty(lp, ref, "k1").item() == pytest.approx(d)
    assert kl_penalty(lp, ref, "k2").item() == pytest.approx(0.5 * d * d)
    assert kl_penalty(lp, ref, "k3").item() == pytest.approx(0.5 - math.log(0.5) - 1)
    x = torch.randn(100, 3)
    assert (kl_penalty(x, torch.randn(100, 3), "k3") >= 0).all()
    assert torch.allclose(kl_penalty(x, x, "k3"), torch.zeros(100, 3))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_dual_stream_hand_computed_each_aggregation(agg):
    b = make_batch(B=4, T=3, n_aux=2, prefix=1, lengths=[3, 2, 3, 2])
    b.advantages = torch.tensor([1.0, -1.0, 2.0, -0.5])
    lp = b.old_logprobs.clone()  # ratio 1: per-token pg loss = -A
    cfg = LossConfig(aggregation=agg, lam=0.5, kl_coef=0.0)
    out = dual_stream_loss(b, lp, None, cfg)
    # main rows: 3 and 2 trainable tokens; aux rows: 2 and 1 (prefix of 1 masked)
    if agg == "token-mean":
        main = (-1 * 3 + 1 * 2) / 5
        aux = (-2 * 2 + 0.5 * 1) / 3
    elif agg == "seq-mean-token-mean":
        main = (-1 + 1) / 2
        aux = (-2 + 0.5) / 2
    else:
        main = (-1 * 3 + 1 * 2) / (2 * 3)
        aux = (-2 * 2 + 0.5 * 1) / (2 * 3)
    assert out.pg_main.item() == pytest.approx(main)
    assert out.pg_aux.item() == pytest.approx(aux)
    assert out.loss.item() == pytest.approx(main + 0.5 * aux)


def test_kl_weighting_option():
    b = make_batch(B=4, T=4, n_aux=2)
    lp = b.old_logprobs + 0.1
    ref = b.old_logprobs
    for weighted in (True, False):
        cfg = LossConfig(lam=0.3, kl_coef=0.5, kl_weighted_by_lambda=weighted)
        out = dual_stream_loss(b, lp, ref, cfg)
        w = 0.3 if weighted else 1.0
        expect = out.pg_main + 0.3 * out.pg_aux + 0.5 * (out.kl_main + w * out.kl_aux)
        assert out.loss.item() == pytest.approx(expect.item())
        assert out.kl_aux.item() > 0


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]),
       st.one_of(st.just(0.0), st.floats(0.1, 2.0)), st.booleans())
def test_prefix_tokens_of_aux_samples_get_exactly_zero_gradient(seed, agg, lam, kl):
    b = make_batch(B=6, T=7, n_aux=3, prefix=3, seed=seed, lengths=[7, 5, 6, 7, 6, 4])
    lp = (b.old_logprobs + 0.3 * torch.randn(6, 7, generator=torch.Generator().manual_seed(seed))).requires_grad_()
    cfg = LossConfig(aggregation=agg, lam=lam, kl_coef=0.1 if kl else 0.0)
    out = dual_stream_loss(b, lp, b.old_logprobs - 0.2 if kl else None, cfg)
    out.loss.backward()
    aux = b.stream == AUX
    assert (lp.grad[aux, :3] == 0).all()
    assert (lp.grad[~b.response_mask] == 0).all()
    if lam > 0:
        assert lp.grad[aux, 3:].abs().sum() > 0


def test_ratio_one_no_kl_equals_reinforce_gradient():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 5, requires_grad=True)  # [B, T, V] a tabular policy
    tokens = torch.randint(0, 5, (3, 6))
    b = make_batch(B=3, T=6, n_aux=0, lengths=[6, 4, 5])
    b.tokens = tokens
    b.advantages = torch.tensor([0.7, -1.2, 0.4])
    lp = torch.log_softmax(logits, -1).gather(2, tokens[..., None]).squeeze(-1)  # [B, T]
    b.old_logprobs = lp.detach()
    out = dual_stream_loss(b, lp, None, LossConfig(kl_coef=0.0))
    (g_loss,) = torch.autograd.grad(out.loss, logits, retain_graph=True)
    # REINFORCE with a baseline: -1/N Σ_b A_b Σ_t ∇ log π(a_t)
    m = b.response_mask.float()
    reinforce = -(b.advantages[:, None] * lp * m).sum() / m.sum()
    (g_ref,) = torch.autograd.grad(reinforce, logits)
    assert torch.allclose(g_loss, g_ref, atol=1e-7)


def test_lambda_zero_is_main_only_loss():
    # with the aux KL weighted by λ, λ = 0 removes the aux stream entirely
    b = make_batch(B=6, T=5, n_aux=3)
    lp = (b.old_logprobs + 0.05).requires_grad_()
    out = dual_stream_loss(b, lp, b.old_logprobs, LossConfig(lam=0.0, kl_weighted_by_lambda=True))
    out.loss.backward()
    main_rows = torch.nonzero(b.stream == MAIN).flatten()
    lp2 = (b.old_logprobs[main_rows] + 0.05).requires_grad_()
    out2 = dual_stream_loss(b.select(main_rows), lp2, b.old_logprobs[main_rows],
                            LossConfig(lam=0.0, kl_weighted_by_lambda=True))
    out2.loss.backward()
    assert out.loss.item() == pytest.approx(out2.loss.item())
    assert torch.equal(lp.grad[main_rows], lp2.grad)
    assert (lp.grad[b.stream == AUX] == 0).all()


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_accumulate_to_the_full_batch_gradient(agg):
    b = make_batch(B=7, T=6, n_aux=3, seed=3)
    cfg = LossConfig(aggregation=agg, lam=0.7, kl_coef=0.1)
    ref = b.old_logprobs - 0.1
    lp = (b.old_logprobs + 0.2).requires_grad_()
    full = dual_stream_loss(b, lp, ref, cfg)
    full.loss.backward()
    den = loss_denominators(b, cfg)
    lp2 = (b.old_logprobs + 0.2).requires_grad_()
    total = 0.0
    for idx in (torch.arange(0, 3), torch.arange(3, 5), torch.arange(5, 7)):
        out = dual_stream_loss(b.select(idx), lp2[idx], ref[idx], cfg, den)
        out.loss.backward()
        total += out.loss.item()
    assert total == pytest.approx(full.loss.item(), rel=1e-6)
    assert torch.allclose(lp.grad, lp2.grad, atol=1e-7)


def test_truncated_importance_sampling_weights_tokens_by_capped_trainer_over_rollout_ratio():
    b = make_batch(B=4, T=5, n_aux=2, seed=7)
    shift = torch.tensor([[0.5], [-0.3], [1.2], [0.0]])  # trainer log-prob minus rollout log-prob
    lp = (b.old_logprobs + shift).requires_grad_()
    out = dual_stream_loss(b, lp, None, LossConfig(kl_coef=0.0, tis_cap=2.0))
    out.loss.backward()
    w = torch.exp(shift).clamp(max=2.0).expand(4, 5)  # [B, T]
    # ratio 1 against the trainer's own log-probs: REINFORCE weighted by w
    mask = b.trainable_mask & b.response_mask
    lp2 = (b.old_logprobs + shift).requires_grad_()
    main = b.stream == MAIN
    ref = sum(-(b.advantages[rows, None] * lp2[rows] * w[rows] * mask[rows]).sum() / mask[rows].sum()
              for rows in (main, ~main))
    ref.backward()
    assert out.loss.item() == pytest.approx(-sum(float((b.advantages[r, None] * w[r] * mask[r]).sum() / mask[r].sum())
                                                for r in (main, ~main)), rel=1e-6)
    assert torch.allclose(lp.grad, lp2.grad, atol=1e-7)
    assert out.metrics["tis_capped_fraction"] > 0  # exp(1.2) > 2 is capped


def test_raw_denominators_of_data_parallel_shares_sum_to_the_global_batchs():
    """A rank with an empty stream contributes 0, not the floor of 1: the sum over shares
    (then floored) equals the whole batch's denominator."""
    b = make_batch(B=6, T=5, n_aux=2, seed=4)
    main_only = b.select(torch.nonzero(b.stream == MAIN).flatten())
    aux_only = b.select(torch.nonzero(b.stream == AUX).flatten())
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        cfg = LossConfig(aggregation=agg, norm_length=5)
        whole = loss_denominators(b, cfg)
        parts = [loss_denominators(x, cfg, floor=False) for x in (main_only, aux_only)]
        assert parts[0][AUX] == 0.0 and parts[1][MAIN] == 0.0
        assert {s: max(parts[0][s] + parts[1][s], 1.0) for s in (MAIN, AUX)} == whole
        assert loss_denominators(main_only, cfg)[AUX] == 1.0  # the floored value a rank must not sum
