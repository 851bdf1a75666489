"""A tiny deterministic-structure backend for testing the core without sims/ or llm/.

A prompt is an integer ``p``; a response is ``T`` tokens from a vocabulary of size ``V``. The
policy is a table of logits ``[P, T, V]`` (a torch parameter); the correct token at step t of
prompt p is ``(p + t) % V``; reward 1 iff all T tokens are correct. Each token is one segment.
"""

from __future__ import annotations

import torch

from deepgrpo.batch import Batch, Rollouts, SampleRequest


class ToyBackend:
    def __init__(self, n_prompts: int = 4, T: int = 5, V: int = 3, seed: int = 0, p_correct: float = 0.7):
        self.T, self.V = T, V
        g = torch.Generator().manual_seed(seed)
        base = torch.full((n_prompts, T, V), 0.0)
        correct = (torch.arange(n_prompts)[:, None] + torch.arange(T)[None, :]) % V
        logit = torch.log(torch.tensor(p_correct / ((1 - p_correct) / (V - 1))))
        base.scatter_(2, correct.unsqueeze(-1), float(logit))
        self.correct = correct  # [P, T]
        self.logits = torch.nn.Parameter(base)
        self.ref_logits = base.clone()
        self.gen = g
        self.sample_calls: list[list[SampleRequest]] = []

    def sample(self, requests):
        self.sample_calls.append(list(requests))
        rows_tok, rows_lp, rows_mask, rewards, ends = [], [], [], [], []
        with torch.no_grad():
            logp = torch.log_softmax(self.logits, -1)
            for r in requests:
                prefix = r.prefix if r.prefix is not None else torch.zeros(0, dtype=torch.long)
                P0 = prefix.numel()
                for _ in range(r.n):
                    toks = torch.zeros(self.T, dtype=torch.long)
                    lps = torch.zeros(self.T)
                    for t in range(P0, self.T):
                        tok = torch.multinomial(logp[r.prompt, t].exp(), 1, generator=self.gen)
                        toks[t - P0] = tok
                        lps[t - P0] = logp[r.prompt, t, tok]
                    n = self.T - P0
                    mask = torch.arange(self.T) < n
                    full = torch.cat([prefix, toks[:n]])
                    rows_tok.append(toks)
                    rows_lp.append(lps)
                    rows_mask.append(mask)
                    rewards.append(float((full == self.correct[r.prompt]).all()))
                    ends.append(torch.arange(1, self.T + 1))
        return Rollouts(tokens=torch.stack(rows_tok), logprobs=torch.stack(rows_lp), mask=torch.stack(rows_mask),
                        rewards=torch.tensor(rewards), segment_ends=ends)

    def logprobs(self, batch: Batch, model: str = "policy"):
        logits = self.logits if model == "policy" else self.ref_logits
        prompts = torch.tensor([batch.prompts[i] for i in batch.prompt_index.tolist()])
        logp = torch.log_softmax(logits, -1)[prompts]  # [B, T, V]
        W = batch.tokens.shape[1]
        logp = logp[:, :W]
        out = logp.gather(2, batch.tokens[:, :logp.shape[1]].unsqueeze(-1)).squeeze(-1)
        if model != "policy":
            out = out.detach()
        return out
