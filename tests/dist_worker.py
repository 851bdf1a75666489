"""Launched by tests/test_distributed.py with ``torchrun --nproc_per_node 2``.

Every rank builds the same toy backend and the same global batch; each rank trains on its
prompt shard with ``update_policy(data_parallel=True)``; rank 0 compares the resulting
parameters with a single-process step on the whole batch and checks that the gathered
estimators are identical on all ranks. Writes a JSON verdict to argv[1].
"""

import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from dist_teardown import finish_worker  # noqa: E402
from toy_backend import ToyBackend  # noqa: E402

from deepgrpo.distributed import GatheredEstimator, shard, world  # noqa: E402
from deepgrpo.estimators import PositionLogistic  # noqa: E402
from deepgrpo.explore import explore
from deepgrpo.methods import method_config  # noqa: E402
from deepgrpo.step import update_policy  # noqa: E402


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, ws = world()
    torch.set_num_threads(1)
    prompts = list(range(6))
    be = ToyBackend(n_prompts=6, seed=0)
    cfg = method_config("deep-grpo", kl_coef=0.05, drop_zero=False)
    # the same global batch on every rank (same seeds)
    res = explore(be, prompts, cfg, PositionLogistic(), np.random.default_rng(0))
    single = copy.deepcopy(be)
    mine = torch.tensor(shard(prompts))
    rows = torch.isin(res.batch.prompt_index, mine)
    # SGD: the check is on gradients; Adam would turn float rounding on ~0 gradients into full steps
    opt = torch.optim.SGD([be.logits], lr=0.5)
    m = update_policy(be, res.batch.select(rows), cfg.loss, opt, [be.logits], micro_batch_size=5,
                      data_parallel=True)
    # estimator fed with different data per rank
    est = GatheredEstimator(PositionLogistic())
    rng = np.random.default_rng(100 + rank)
    for _ in range(3):
        r = rng.uniform(0, 1, 30 + 10 * rank)
        est.update({"rel_depth": r}, (rng.random(r.size) < 1 - r).astype(float))
    states = [None] * ws
    dist.all_gather_object(states, (est.coef.tolist(), est.buffer_len, be.logits.detach().numpy().tolist()))
    if rank == 0:
        opt1 = torch.optim.SGD([single.logits], lr=0.5)
        m1 = update_policy(single, res.batch, cfg.loss, opt1, [single.logits], data_parallel=False)
        diff = float((single.logits - be.logits).abs().max())
        same_est = all(s[0] == states[0][0] and s[1] == states[0][1] for s in states)
        same_params = all(np.array_equal(np.array(s[2]), np.array(states[0][2])) for s in states)
        moved = float((single.logits - torch.tensor(ToyBackend(n_prompts=6, seed=0).logits.detach())).abs().max())
        Path(out).write_text(json.dumps({
            "world": ws, "max_param_diff": diff, "moved": moved, "same_estimator": same_est,
                   "same_params_on_ranks": same_params, "buffer_len": states[0][1],
                   "grad_norm_dp": m["grad_norm"], "grad_norm_single": m1["grad_norm"],
                   "rows_per_rank": int(rows.sum())}))
    finish_worker()


if __name__ == "__main__":
    main(sys.argv[1])
