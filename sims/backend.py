"""The simulator as a core :class:`~deepgrpo.batch.Backend`.

Prompts are problem indices (ints). ``sample`` continues each request's prefix tokens exactly:
the prefix's status is replayed deterministically and only the suffix is sampled, so the
rollouts hold suffix tokens, their sampling log-probs and a reward of the full chain.
Each row covers its own problem's length L_p (variable-length problem sets: the mask ends
there, so budgets count only real tokens). Segment ends are every ``segment_len`` steps of the
problem (full-chain coordinates, last = L_p).

``Rollouts.extras`` (analysis only; the core carries them along):
    ``problem``      ``LongTensor [B]``
    ``first_error``  ``LongTensor [B]`` first wrong step of the full chain (L_p if none)
    ``on_track``     ``BoolTensor [B, T]`` on track after each step (full-chain coordinates;
                     frozen after L_p)
    ``start_status`` ``LongTensor [B]`` status reached by the prefix (0 on-track, 1 derailed)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deepgrpo.batch import Batch, Rollouts, SampleRequest
from sims.oracle import success_table
from sims.policy import TokenTreePolicy
from sims.sampler import replay_status, sample_chains, suffixes, token_logprobs
from sims.spec import ProblemSet


class SimBackend:
    """Implements ``sample`` and ``logprobs`` of the core's Backend protocol for the simulator.

    Args:
        problems: the problem set.
        policy: the trainable policy (sampling uses its current weights, without gradient).
        generator: torch Generator, the only source of sampling randomness.
    """

    def __init__(self, problems: ProblemSet, policy: TokenTreePolicy, generator: torch.Generator) -> None:
        self.problems = problems
        self.policy = policy
        self.generator = generator

    def sample(self, requests: Sequence[SampleRequest]) -> Rollouts:
        T = self.problems.T
        n_rows = torch.tensor([int(r.n) for r in requests], dtype=torch.long)  # [R]
        problem_req = torch.tensor([int(r.prompt) for r in requests], dtype=torch.long)  # [R]
        plen_req = torch.tensor([0 if r.prefix is None else int(r.prefix.numel()) for r in requests],
                                dtype=torch.long)  # [R]
        if bool((problem_req < 0).any()) or bool((problem_req >= self.problems.n).any()):
            raise ValueError(f"requests must name problems in [0, {self.problems.n})")
        if bool((plen_req > self.problems.lengths[problem_req]).any()):
            raise ValueError("a request's prefix is longer than its problem")
        problem = problem_req.repeat_interleave(n_rows)  # [B]
        length = self.problems.lengths[problem]  # [B]
        with torch.no_grad():
            log_probs = self.policy.log_probs()  # [n, T, 2, V]
        if bool((plen_req > 0).any()):
            prefix_req = torch.zeros(len(requests), T, dtype=torch.long)  # [R, T]
            flat = torch.cat([r.prefix.reshape(-1).long() for r in requests if r.prefix is not None])  # [Σ plen]
            req_row = torch.repeat_interleave(torch.arange(len(requests)), plen_req)  # [Σ plen]
            starts = torch.cumsum(plen_req, 0) - plen_req  # [R]
            col = torch.arange(flat.numel()) - torch.repeat_interleave(starts, plen_req)  # [Σ plen]
            prefix_req[req_row, col] = flat
            prefix = prefix_req.repeat_interleave(n_rows, dim=0)  # [B, T]
            plen = plen_req.repeat_interleave(n_rows)  # [B]
            chains = sample_chains(self.problems, log_probs, problem, self.generator, prefix, plen)
            tokens = suffixes(chains.tokens, plen)  # [B, T]
            logprobs = suffixes(chains.logprobs, plen)  # [B, T]
            mask = torch.arange(T).unsqueeze(0) < (length - plen).unsqueeze(1)  # [B, T]
            start_status = chains.status.gather(1, plen.unsqueeze(1)).squeeze(1)  # [B]
        else:
            chains = sample_chains(self.problems, log_probs, problem, self.generator)
            tokens, logprobs = chains.tokens, chains.logprobs
            mask = torch.arange(T).unsqueeze(0) < length.unsqueeze(1)  # [B, T]
            start_status = chains.status[:, 0]
        ends = self.problems.segment_ends
        extras = {"problem": problem, "first_error": chains.first_error, "on_track": chains.on_track,
                  "start_status": start_status}
        if not bool((plen_req > 0).any()):
            # main chains: the exact P(success | the first t tokens) under the sampling policy, for
            # every prefix length t (the core turns it into the candidate feature oracle_success)
            with torch.no_grad():
                W = success_table(self.problems, self.policy.correct_probs())  # [n, T+1, 2]
            t = torch.arange(T + 1).unsqueeze(0).expand(len(problem), -1)  # [B, T+1]
            extras["cand_oracle_success"] = W[problem.unsqueeze(1), t, chains.status]  # [B, T+1]
        return Rollouts(tokens=tokens, logprobs=logprobs, mask=mask, rewards=chains.rewards,
                        segment_ends=[ends[p] for p in problem.tolist()], extras=extras)

    def logprobs(self, batch: Batch, model: str = "policy") -> torch.Tensor:
        """``[B, W]`` log-probs of ``batch.tokens`` (full chains) under the policy (with
        gradient) or the reference (pre-trained) policy; positions >= T are 0."""
        if model not in ("policy", "reference"):
            raise ValueError(f"model = {model!r} is invalid: expected policy or reference")
        T = self.problems.T
        problem = torch.as_tensor([int(p) for p in batch.prompts], dtype=torch.long)[batch.prompt_index]  # [B]
        tokens = batch.tokens[:, :T]  # [B, L]
        status = replay_status(self.problems, problem, tokens)  # [B, L+1]
        if model == "policy":
            table = self.policy.log_probs()
        else:
            table = self.policy.reference_log_probs()
        out = token_logprobs(table, problem, status, tokens)  # [B, L]
        if batch.tokens.shape[1] > T:
            out = torch.nn.functional.pad(out, (0, batch.tokens.shape[1] - T))
        return out if model == "policy" else out.detach()
