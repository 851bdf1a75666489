"""The simulator as a core :class:`~deepgrpo.batch.Backend`.

Prompts are problem indices (ints). ``sample`` continues each request's prefix tokens exactly:
the prefix's status is replayed deterministically and only the suffix is sampled, so the
rollouts hold suffix tokens, their sampling log-probs and a reward of the full chain.
Each row covers its own problem's length L_p (variable-length problem sets: the mask ends
there, so budgets count only real tokens). Segment ends are every ``segment_len`` steps of the
problem (full-chain coordinates, last = L_p).

``sample`` reads the policy's tables (sampling CDF, oracle table) from its snapshot, computed once
per set of weights (:meth:`~sims.policy.TokenTreePolicy.snapshot`); ``logprobs`` computes the
policy's log-probs with gradient on every call, and replays a micro-batch's statuses once for
its policy and reference passes.

``Rollouts.extras`` (analysis only; the core carries them along):
    ``problem``      ``LongTensor [B]``
    ``first_error``  ``LongTensor [B]`` first wrong step of the full chain (L_p if none)
    ``on_track``     ``BoolTensor [B, T]`` on track after each step (full-chain coordinates;
                     frozen after L_p)
    ``start_status`` ``LongTensor [B]`` status reached by the prefix (0 on-track, 1 derailed)

Main chains (requests from the root) also carry two candidate features
(:data:`deepgrpo.explore.CANDIDATE_EXTRA_PREFIX`), a value per prefix length t = 0..T:
    ``cand_oracle_success`` ``DoubleTensor [B, T+1]`` exact P(success | the first t tokens)
    ``cand_next_entropy``   ``DoubleTensor [B, T+1]`` entropy (nats) of π(· | problem, t, status
                            after t tokens), the distribution a branch from there resamples
                            from; 0 for t >= L_p (the chain has ended)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from deepgrpo.batch import Batch, Rollouts, SampleRequest
from sims.policy import TokenTreePolicy, reuse_enabled
from sims.sampler import replay_status, sample_chains, suffixes, token_logprobs
from sims.spec import ProblemSet


class SimBackend:
    """Implements ``sample`` and ``logprobs`` of the core's Backend protocol for the simulator.

    Args:
        problems: the problem set (for R runs: their :meth:`~sims.spec.ProblemSet.stack`, run r's
            problem p being prompt r·n + p).
        policy: the trainable policy (sampling uses its current weights, without gradient).
        generator: torch Generator, the only source of sampling randomness; for R runs, one per
            run: a run's rows are drawn from its own, ``torch.rand(T, B_r)`` as if it were alone,
            so that its chains do not depend on the other runs of the batch.
    """

    def __init__(self, problems: ProblemSet, policy: TokenTreePolicy,
                 generator: torch.Generator | Sequence[torch.Generator]) -> None:
        self.problems = problems
        self.policy = policy
        self.generators = [generator] if isinstance(generator, torch.Generator) else list(generator)
        self.generator = self.generators[0]
        if problems.n % len(self.generators):
            raise ValueError(f"{problems.n} problems cannot be split evenly over {len(self.generators)} runs")
        self._per_run = problems.n // len(self.generators)
        self._replay: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def _uniforms(self, problem: np.ndarray) -> torch.Tensor:
        """``[T, B]`` the sampler's uniforms: each run's rows (contiguous) from its own generator."""
        T = self.problems.T
        if len(self.generators) == 1:
            return torch.rand(T, problem.shape[0], generator=self.generator)
        run = problem // self._per_run  # [B]
        if np.any(np.diff(run) < 0):
            raise ValueError("rows of several runs must come run after run")
        bounds = np.flatnonzero(np.diff(run)) + 1
        starts = np.concatenate([[0], bounds]).tolist()
        ends = np.concatenate([bounds, [run.shape[0]]]).tolist()
        return torch.cat([torch.rand(T, b - a, generator=self.generators[int(run[a])]) for a, b in zip(starts, ends)],
                         dim=1) if run.size else torch.rand(T, 0)

    def _replayed(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(``problem [B]``, ``status [B, L+1]``) of ``batch``'s rows, replayed from its tokens;
        kept for the next call on the same batch (the policy pass and the reference pass of a
        micro-batch replay the same tokens). The key holds the tensors themselves (identity and
        version counter) and the prompts, so a changed or different batch is replayed afresh."""
        key = (batch.tokens, batch.tokens._version, batch.prompt_index, batch.prompt_index._version,
               tuple(int(p) for p in batch.prompts))
        hit = self._replay
        if hit is not None and reuse_enabled() and len(hit[0]) == len(key) and all(
                a is b if torch.is_tensor(a) else a == b for a, b in zip(hit[0], key)):
            return hit[1], hit[2]
        problem = torch.as_tensor(key[-1], dtype=torch.long)[batch.prompt_index]  # [B]
        status = replay_status(self.problems, problem, batch.tokens[:, :self.problems.T])  # [B, L+1]
        self._replay = (key, problem, status)
        return problem, status

    def sample(self, requests: Sequence[SampleRequest]) -> Rollouts:
        problems = self.problems
        T, R = problems.T, len(requests)
        # the requests' bookkeeping in numpy (a few Python operations per request, no tensors)
        n_req = np.array([int(r.n) for r in requests], dtype=np.int64)  # [R]
        problem_req = np.array([int(r.prompt) for r in requests], dtype=np.int64)  # [R]
        prefixes = [r.prefix if r.prefix.dim() == 1 else r.prefix.reshape(-1) for r in requests
                    if r.prefix is not None]
        plen_req = np.array([0 if r.prefix is None else r.prefix.numel() for r in requests], dtype=np.int64)  # [R]
        prefix_req = None
        if plen_req.any():
            prefix_req = np.zeros((R, T), dtype=np.int64)  # [R, T]
            flat = torch.cat(prefixes).numpy()  # [Σ plen]
            if flat.size:
                starts = np.cumsum(plen_req) - plen_req  # [R]
                col = np.arange(flat.size) - np.repeat(starts, plen_req)  # [Σ plen]
                if col.max() >= T:
                    raise ValueError("a request's prefix is longer than its problem")
                prefix_req[np.repeat(np.arange(R), plen_req), col] = flat
        return self._sample(problem_req, plen_req, prefix_req, n_req)

    def sample_branches(self, prompts: Sequence[int], tokens: torch.Tensor, prefix_len: torch.Tensor,
                        n: torch.Tensor) -> Rollouts:
        """``sample`` of the requests ``SampleRequest(prompts[a], tokens[a, :prefix_len[a]], n[a])``
        given as tensors (``tokens`` ``LongTensor [A, >= max prefix_len]``, ``prefix_len`` and ``n``
        ``[A]``): the same rollouts, without a Python object per branch point."""
        T = self.problems.T
        plen_req = np.asarray(prefix_len, dtype=np.int64).reshape(-1)  # [A]
        if plen_req.size and plen_req.max() > min(T, tokens.shape[1]):
            raise ValueError("a request's prefix is longer than its problem")
        prefix_req = np.zeros((plen_req.shape[0], T), dtype=np.int64)  # [A, T]
        width = min(T, tokens.shape[1])
        prefix_req[:, :width] = tokens[:, :width].numpy()
        prefix_req[np.arange(T)[None, :] >= plen_req[:, None]] = 0  # only the prefix
        return self._sample(np.asarray(prompts, dtype=np.int64).reshape(-1), plen_req,
                            prefix_req if plen_req.any() else None, np.asarray(n, dtype=np.int64).reshape(-1))

    def _sample(self, problem_req: np.ndarray, plen_req: np.ndarray, prefix_req: np.ndarray | None,
                n_req: np.ndarray) -> Rollouts:
        """The rollouts of R requests: problem ``[R]``, prefix length ``[R]``, prefix tokens
        ``[R, T]`` (None: all from the root) and continuations ``[R]``."""
        problems = self.problems
        T, R = problems.T, problem_req.shape[0]
        if R and (problem_req.min() < 0 or problem_req.max() >= problems.n):
            raise ValueError(f"requests must name problems in [0, {problems.n})")
        lengths = problems.lengths.numpy()  # [n]
        if bool((plen_req > lengths[problem_req]).any()):
            raise ValueError("a request's prefix is longer than its problem")
        problem_np = np.repeat(problem_req, n_req)  # [B]
        problem = torch.from_numpy(problem_np)  # [B]
        length = lengths[problem_np]  # [B]
        snap = self.policy.snapshot()  # the step's tables, computed once per set of weights
        log_probs = snap.sampling  # log π and its CDF, step-major [T, n·2, V] (the sampler's layout)
        continued = prefix_req is not None
        if continued:
            prefix = np.repeat(prefix_req, n_req, axis=0)  # [B, T]
            plen = np.repeat(plen_req, n_req)  # [B]
            chains = sample_chains(problems, log_probs, problem, None, torch.from_numpy(prefix),
                                   torch.from_numpy(plen), uniforms=self._uniforms(problem_np))
            plen_t = torch.from_numpy(plen)
            tokens = suffixes(chains.tokens, plen_t)  # [B, T]
            logprobs = suffixes(chains.logprobs, plen_t)  # [B, T]
            mask = torch.from_numpy(np.arange(T)[None, :] < (length - plen)[:, None])  # [B, T]
            start_status = torch.from_numpy(chains.status.numpy()[np.arange(len(plen)), plen])  # [B]
        else:
            chains = sample_chains(problems, log_probs, problem, None, uniforms=self._uniforms(problem_np))
            tokens, logprobs = chains.tokens, chains.logprobs
            mask = torch.from_numpy(np.arange(T)[None, :] < length[:, None])  # [B, T]
            start_status = chains.status[:, 0]
        ends = problems.segment_ends
        extras = {"problem": problem, "first_error": chains.first_error, "on_track": chains.on_track,
                  "start_status": start_status}
        if not continued:
            # main chains: the exact P(success | the first t tokens) under the sampling policy, for
            # every prefix length t (the core turns it into the candidate feature oracle_success)
            W = snap.success_table(problems).numpy()  # [n, T+1, 2]
            status = chains.status.numpy()  # [B, T+1] status after t tokens (before step t)
            extras["cand_oracle_success"] = torch.from_numpy(
                W[problem_np[:, None], np.arange(T + 1)[None, :], status])  # [B, T+1]
            # the entropy of π(· | problem, t, status) a branch from prefix length t resamples from
            # (the candidate feature next_entropy); 0 at and after the chain's end
            H = snap.entropy.double().numpy()  # [n, T, 2]
            t_idx = np.minimum(np.arange(T + 1), T - 1)[None, :]  # [1, T+1]
            ent = H[problem_np[:, None], t_idx, status]  # [B, T+1]
            extras["cand_next_entropy"] = torch.from_numpy(
                np.where(np.arange(T + 1)[None, :] < length[:, None], ent, 0.0))  # [B, T+1]
        return Rollouts(tokens=tokens, logprobs=logprobs, mask=mask, rewards=chains.rewards,
                        segment_ends=[ends[p] for p in problem_np.tolist()], extras=extras)

    def logprobs(self, batch: Batch, model: str = "policy") -> torch.Tensor:
        """``[B, W]`` log-probs of ``batch.tokens`` (full chains) under the policy (with
        gradient) or the reference (pre-trained) policy; positions >= T are 0."""
        if model not in ("policy", "reference"):
            raise ValueError(f"model = {model!r} is invalid: expected policy or reference")
        T = self.problems.T
        tokens = batch.tokens[:, :T]  # [B, L]
        problem, status = self._replayed(batch)  # [B], [B, L+1]
        if model == "policy":
            table = self.policy.log_probs()
        else:
            table = self.policy.reference_log_probs()
        out = token_logprobs(table, problem, status, tokens)  # [B, L]
        if batch.tokens.shape[1] > T:
            out = torch.nn.functional.pad(out, (0, batch.tokens.shape[1] - T))
        return out if model == "policy" else out.detach()
