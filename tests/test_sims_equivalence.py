"""The simulator's fast paths give exactly the numbers of the plain ones.

A training step reads the policy's tables (log-probs, sampling CDF, oracle table, entropy) from
one :class:`~sims.policy.PolicySnapshot` per set of weights, and the backend replays a
micro-batch's statuses once for its policy and reference passes. Runs with that reuse must be
bit-for-bit the runs that recompute everything on every call (:func:`sims.policy.fresh_snapshots`).
The sampler, the status replay and the token gather work in numpy; they must give exactly
what their plain torch formulations below give (same uniforms, same float32 tables).
"""

import dataclasses
import itertools
import math
import struct

import pytest
import torch

from deepgrpo import method_config
from sims.optim import DEFAULT_LR
from sims.policy import TokenTreePolicy, fresh_snapshots
from sims.runner import RunnerConfig, train
from sims.sampler import SamplingTable, replay_status, sample_chains, suffixes, token_logprobs
from sims.spec import DERAILED, ON_TRACK, TokenTreeSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bits(row: dict) -> dict:
    """A history row with every float as its exact bits (NaN included)."""
    return {k: (struct.pack("<d", v).hex() if isinstance(v, float) else v) for k, v in row.items()}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        bits = torch.int64 if a.element_size() == 8 else torch.int32
        a, b = a.contiguous().view(bits), b.contiguous().view(bits)
    return torch.equal(a, b)


def _history(spec: TokenTreeSpec, method: str, cfg: RunnerConfig, seed: int) -> list[dict]:
    return [_bits(r) for r in train(spec, method_config(method), cfg, seed=seed, method=method).history]


@pytest.mark.parametrize("policy,optimizer", list(itertools.product(("tabular", "features"), ("adam", "sgd"))))
def test_runs_reusing_the_step_tables_equal_runs_recomputing_them(policy, optimizer):
    spec = TokenTreeSpec(n_problems=16, n_heldout=8)
    cfg = RunnerConfig(steps=8, batch_problems=8, policy=policy, feature_dim=64, optimizer=optimizer,
                       lr=DEFAULT_LR[optimizer])
    for method in ("grpo", "deep-grpo", "oracle-informative"):
        fast = _history(spec, method, cfg, seed=3)
        with fresh_snapshots():
            slow = _history(spec, method, cfg, seed=3)
        assert fast == slow, (policy, optimizer, method)
        assert len(fast) == 9 and fast[-1]["pass1"] != fast[0]["pass1"]  # the policy did move


def test_reuse_equals_recompute_with_variable_lengths_recovery_and_micro_batches():
    spec = TokenTreeSpec(n_problems=12, n_heldout=4, min_depth=5, recovery="decay", segment_len=2)
    cfg = RunnerConfig(steps=6, batch_problems=6, policy="features", feature_dim=32, micro_batch_size=13)
    for method in ("deep-grpo", "tree-surprisal"):
        fast = _history(spec, method, cfg, seed=1)
        with fresh_snapshots():
            slow = _history(spec, method, cfg, seed=1)
        assert fast == slow, method


def test_a_snapshot_is_reused_only_while_the_weights_are_the_same():
    problems = TokenTreeSpec(n_problems=4, n_heldout=0, seed=2).build()
    for kind in ("tabular", "features"):
        policy = TokenTreePolicy(problems, kind, 16)
        param = next(policy.parameters())  # zeros at the start
        step = torch.linspace(-1.0, 1.0, param.numel()).reshape(param.shape)
        snap = policy.snapshot()
        assert policy.snapshot() is snap  # unchanged weights: the same tables
        with torch.no_grad():
            param.add_(step)
        moved = policy.snapshot()
        assert moved is not snap and not torch.equal(moved.log_probs, snap.log_probs)
        param.data.sub_(step)  # back to zeros in place through .data (no version bump): still seen
        back = policy.snapshot()
        assert back is not moved and torch.equal(back.log_probs, snap.log_probs)
        with torch.no_grad():
            param.mul_(-1.0)  # zeros become -0.0: other bits, so a new snapshot (same numbers)
        negated = policy.snapshot()
        assert negated is not back and policy.snapshot() is negated
        with torch.no_grad():
            policy.base.add_(1.0)  # a buffer changed in place
        assert policy.snapshot() is not negated
        with torch.no_grad():
            param.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(0))
        fresh = policy.snapshot()
        with torch.no_grad():
            assert torch.equal(fresh.log_probs, policy.log_probs())
        assert torch.equal(fresh.correct_probs, policy.correct_probs())
        # the oracle's input read off the correct token's entry is the masked log-sum-exp, bit for bit
        masked = fresh.log_probs.double().masked_fill(~policy.is_correct, float("-inf")).logsumexp(-1).exp()
        assert _same(fresh.correct_probs, masked)
        assert torch.equal(fresh.entropy, policy.entropy())
        with fresh_snapshots():
            assert policy.snapshot() is not fresh


# -- plain torch formulations of the sampler, the replay and the gather ------------------------

def plain_sample_chains(problems, log_probs, problem, generator, prefix=None, prefix_len=None):
    """The sampler step by step in torch: (tokens, logprobs, status, first_error, rewards)."""
    T, B = problems.T, problem.shape[0]
    lp = log_probs.detach().float().transpose(0, 1).contiguous()  # [T, n, 2, V]
    cdf = lp.exp().cumsum(-1)
    cdf[..., -1] = 2.0
    u = torch.rand(T, B, generator=generator)
    length = problems.lengths[problem]
    off = torch.zeros(B, dtype=torch.bool)
    clean = torch.ones(B, dtype=torch.bool)
    tokens = torch.zeros(T, B, dtype=torch.long)
    logprobs = torch.zeros(T, B)
    status = torch.zeros(T + 1, B, dtype=torch.long)
    first_error = torch.zeros(B, dtype=torch.long)
    for t in range(T):
        act = t < length
        s = off.long()
        tok = (cdf[t, problem, s] < u[t].unsqueeze(1)).sum(-1)
        if prefix is not None:
            tok = torch.where(t < prefix_len, prefix[:, min(t, prefix.shape[1] - 1)], tok)
        tok = torch.where(act, tok, 0)
        tokens[t] = tok
        logprobs[t] = torch.where(act, lp[t, problem, s, tok], 0.0)
        wrong = (tok != problems.correct[problem, t]) & act
        clean &= ~wrong
        first_error += clean & act
        new = wrong if bool(problems.recovery_allowed[t]) else (off | wrong)
        off = torch.where(act, new, off)
        status[t + 1] = off.long()
    return tokens.T, logprobs.T, status.T, first_error, (~off).float()


def plain_replay_status(problems, problem, tokens, lengths=None):
    B, L = tokens.shape
    own = problems.lengths[problem]
    lengths = own if lengths is None else torch.minimum(lengths, own)
    status = torch.zeros(B, L + 1, dtype=torch.long)
    for b in range(B):
        s = ON_TRACK
        for t in range(min(L, int(lengths[b]))):
            ok = int(tokens[b, t]) == int(problems.correct[problem[b], t])
            s = ON_TRACK if ok and (s == ON_TRACK or bool(problems.recovery_allowed[t])) else DERAILED
            status[b, t + 1] = s
        status[b, min(L, int(lengths[b])) + 1:] = s
    return status


@pytest.mark.parametrize("recovery,min_depth,vocab", [("fatal", None, 4), ("constant", None, 3),
                                                     ("decay", 3, 4), ("fatal", 4, 11), ("mixed", None, 4),
                                                     ("mixed", 3, 2)])
def test_sampler_replay_and_gather_equal_their_plain_torch_formulations(recovery, min_depth, vocab):
    problems = TokenTreeSpec(depth=8, min_depth=min_depth, vocab_size=vocab,
                             recovery="constant" if recovery == "mixed" else recovery, recovery_prob=0.6,
                             n_problems=5, n_heldout=1, seed=7).build()
    if recovery == "mixed":  # recovery allowed at some steps only (the replay's general rule)
        problems = dataclasses.replace(problems, recovery_allowed=torch.arange(problems.T) % 3 != 1)
    policy = TokenTreePolicy(problems)
    with torch.no_grad():
        policy.delta.normal_(0.0, 1.5, generator=torch.Generator().manual_seed(1))
    lp = policy.log_probs().detach()
    g = torch.Generator().manual_seed(0)
    problem = torch.randint(0, problems.n, (300,), generator=g)
    root = sample_chains(problems, lp, problem, g)
    plen = torch.minimum(torch.randint(0, problems.T + 1, (300,), generator=g), problems.lengths[problem])
    for prefix, prefix_len in ((None, None), (root.tokens, plen)):
        for table in (lp, SamplingTable.from_log_probs(lp)):
            got = sample_chains(problems, table, problem, torch.Generator().manual_seed(5), prefix, prefix_len)
            want = plain_sample_chains(problems, lp, problem, torch.Generator().manual_seed(5), prefix, prefix_len)
            for name, w in zip(("tokens", "logprobs", "status", "first_error", "rewards"), want):
                assert _same(getattr(got, name), w), name
        if prefix is not None:
            j = torch.arange(problems.T)
            for full in (got.tokens, got.logprobs):
                src = (j + prefix_len.unsqueeze(1)).clamp(max=problems.T - 1)
                want = full.gather(1, src).masked_fill(j >= (problems.T - prefix_len).unsqueeze(1), 0)
                assert _same(suffixes(full, prefix_len), want)
    tokens = root.tokens
    assert _same(replay_status(problems, problem, tokens), root.status)
    for L in (1, problems.T // 2, problems.T):
        cut = torch.minimum(plen, torch.tensor(L))
        assert _same(replay_status(problems, problem, tokens[:, :L], cut),
                     plain_replay_status(problems, problem, tokens[:, :L], cut))
    # the gather keeps the table's gradient exactly as plain indexing does
    grads = []
    for gather in ("fast", "plain"):
        table = policy.log_probs()
        if gather == "fast":
            out = token_logprobs(table, problem, root.status, tokens)
        else:
            flat = ((problem.unsqueeze(1) * problems.T + torch.arange(problems.T)) * 2 + root.status[:, :-1]) \
                * problems.V + tokens
            out = table.reshape(-1)[flat]
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads.append((out.detach(), policy.delta.grad.clone()))
        policy.delta.grad = None
    assert _same(grads[0][0], grads[1][0]) and _same(grads[0][1], grads[1][1])
    active = torch.arange(problems.T) < problems.lengths[problem].unsqueeze(1)
    assert _same(grads[0][0].masked_fill(~active, 0.0), root.logprobs)  # the sampler's own log-probs
    assert not math.isnan(float(grads[0][1].sum()))
