"""Launched by tests/test_distributed.py with ``torchrun --nproc_per_node 2``: two data-parallel
ranks run ``llm.trainer.Trainer`` for a few steps on a micro model; rank 0 checks that every
rank ends with identical parameters and estimator, and writes a JSON verdict to argv[3]."""

import json
import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist
from dist_teardown import finish_worker

from llm.backend import SamplingConfig
from llm.evaluate import EvalConfig
from llm.trainer import TrainConfig, Trainer


def main(model_dir: str, out: str, verdict: str) -> None:
    data = Path(__file__).resolve().parents[1] / "llm" / "data" / "arith_sample.jsonl"
    cfg = TrainConfig(model=model_dir, data=None, eval_data=str(data), method="deep-grpo",
                      overrides={"G": 4, "K": 4}, prompts_per_step=4, steps=3, lr=3e-3, checkpoint_every=3,
                      sampling=SamplingConfig(max_response_tokens=40),
                      eval=EvalConfig(n_problems=4, samples=1, pass_k=1, max_response_tokens=40),
                      threads=1, tensorboard=False, seed=5)
    tr = Trainer(cfg, out, progress=False)
    tr.run()
    flat = np.concatenate([p.detach().double().numpy().ravel() for p in tr.policy.parameters()])
    states = [None] * tr.world_size
    dist.all_gather_object(states, (flat.tolist(), tr.estimator.buffer_len, tr.ledger.totals()["prompts"]))
    if tr.rank == 0:
        same = all(np.array_equal(np.array(s[0]), np.array(states[0][0])) for s in states)
        Path(verdict).write_text(json.dumps({
            "world": tr.world_size, "same_params": same, "buffers": [s[1] for s in states],
                   "prompts_per_rank": [s[2] for s in states],
                   "metrics_rows": len(Path(out, "metrics.jsonl").read_text().splitlines())}))
    finish_worker()


if __name__ == "__main__":
    main(*sys.argv[1:4])
