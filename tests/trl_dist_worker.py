"""Worker of test_trl_trainer.py::test_two_processes_take_the_single_process_step.

Run under ``accelerate launch --multi_gpu --num_processes 2 tests/trl_dist_worker.py OUT_DIR
[ESTIMATOR]`` (ESTIMATOR ``position``, the default, or ``selector`` with strategy ``informative``; on a
CPU-only machine accelerate then starts two torchrun processes with gloo; ``--cpu`` alone would
start one process unless MPI is set up). Each
rank trains one DeepGRPOTrainer step (SGD, no clipping) on scripted rollouts: rank 0's prompts
fail more often than rank 1's, so the ranks branch different numbers of aux rows. Every rank
then rebuilds the *single-process* step on the union of both ranks' batches with the core alone
(``dual_stream_loss`` on one concatenated batch, gradients of a fresh copy of the initial
model) and compares parameters. The step is saved as a checkpoint: both ranks' DEEP-GRPO state
files must be on disk before TRL's ``trainer_state.json`` (which marks the checkpoint complete).
Rank 0 writes ``OUT_DIR/result.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from dist_teardown import finish_worker  # noqa: E402
from test_trl_trainer import arith_reward, config, micro_dir, plain_logprobs, scripted_generator  # noqa: E402

from deepgrpo.batch import Batch  # noqa: E402
from deepgrpo.losses import dual_stream_loss  # noqa: E402
from llm.models import build_char_tokenizer  # noqa: E402
from llm.trl_trainer import DeepGRPOTrainer  # noqa: E402

PROMPTS = ["1+2=", "3+4=", "2+2=", "5+1="]
ANSWERS = ["3", "7", "4", "6"]
LR = 0.5


def padded_cat(batches: list[Batch]) -> Batch:
    """One :class:`Batch` of the rows of ``batches`` (right-padded to the widest)."""
    W = max(b.tokens.shape[1] for b in batches)

    def pad(t: torch.Tensor, value=0) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, W - t.shape[1]), value=value)
    return Batch(prompts=[], prompt_index=torch.cat([b.prompt_index for b in batches]),
                 tokens=torch.cat([pad(b.tokens) for b in batches]),
                 old_logprobs=torch.cat([pad(b.old_logprobs) for b in batches]),
                 response_mask=torch.cat([pad(b.response_mask, False) for b in batches]),
                 trainable_mask=torch.cat([pad(b.trainable_mask, False) for b in batches]),
                 stream=torch.cat([b.stream for b in batches]), group=torch.cat([b.group for b in batches]),
                 pivot_depth=torch.cat([b.pivot_depth for b in batches]),
                 prefix_len=torch.cat([b.prefix_len for b in batches]),
                 rewards=torch.cat([b.rewards for b in batches]),
                 advantages=torch.cat([b.advantages for b in batches]),
                 segment_ends=[e for b in batches for e in b.segment_ends])


def main(out: Path, estimator: str = "position") -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(1)
    tok = build_char_tokenizer()
    ds = Dataset.from_dict({"prompt": PROMPTS, "answer": ANSWERS})
    method = {"estimator": "selector", "strategy": "informative"} if estimator == "selector" else {}
    args = config(out / "run", gradient_accumulation_steps=2, beta=0.05, K=3, max_steps=1, segmenter="step",
                  optim="sgd", learning_rate=LR, max_grad_norm=0.0, lr_scheduler_type="constant",
                  shuffle_dataset=False, disable_tqdm=True, save_strategy="steps", save_steps=1, **method)
    rank = args.process_index
    path = out / "model"
    with args.main_process_first():  # rank 0 writes the micro model, then rank 1 reads it
        if rank == 0:
            micro_dir(path)
    trainer = DeepGRPOTrainer(model=str(path), reward_funcs=arith_reward, args=args, train_dataset=ds,
                              processing_class=tok)
    trainer._generate_single_turn = scripted_generator(tok, [])
    trainer.train()

    # what each rank explored: its batch, with the prompts it was given (no shuffling: in order)
    res = trainer.last_exploration
    policy = trainer.accelerator.unwrap_model(trainer.model)
    ent = res.main.extras.get("cand_next_entropy")
    mine = {"batch": res.batch, "questions": [PROMPTS[2 * rank + i] for i in range(2)],
            "aux_rows": len(res.aux) if res.aux is not None else 0, "pivots": len(res.plan),
            "next_entropy_max": None if ent is None else float(ent.max()),
            "estimator_points": int(getattr(trainer.estimator.inner, "buffer_len", -1)),
            "params": {n: p.detach().cpu() for n, p in policy.named_parameters()}}
    parts = [None, None]
    dist.all_gather_object(parts, mine)

    # the single-process step on the union of the two batches, by the core alone
    model0 = AutoModelForCausalLM.from_pretrained(str(path)).float()
    ref = AutoModelForCausalLM.from_pretrained(str(path)).float().eval()
    union = padded_cat([p["batch"] for p in parts])
    questions = [p["questions"][i] for p in parts for i in p["batch"].prompt_index.tolist()]
    prompt_ids = torch.tensor([tok(q)["input_ids"] for q in questions])
    lp = plain_logprobs(model0, prompt_ids, union.tokens, union.response_mask)
    with torch.no_grad():
        ref_lp = plain_logprobs(ref, prompt_ids, union.tokens, union.response_mask)
    union.old_logprobs = lp.detach()
    dual_stream_loss(union, lp, ref_lp, trainer.algo.loss).loss.backward()
    expected = {n: (p - LR * p.grad).detach() for n, p in model0.named_parameters()}
    trained = parts[rank]["params"]
    diff = max(float((trained[n] - expected[n]).abs().max()) for n in expected)
    between = max(float((parts[0]["params"][n] - parts[1]["params"][n]).abs().max()) for n in trained)
    change = max(float((trained[n] - p.detach()).abs().max()) for n, p in
                 AutoModelForCausalLM.from_pretrained(str(path)).named_parameters())
    print(f"rank {rank}: aux rows {[p['aux_rows'] for p in parts]}, max |trained - single-process| = {diff:.3g}, "
          f"between ranks {between:.3g}, change {change:.3g}", flush=True)
    diffs = [None, None]
    dist.all_gather_object(diffs, diff)
    if rank == 0:
        ck = Path(args.output_dir) / "checkpoint-1"
        marked = (ck / "trainer_state.json").stat().st_mtime_ns
        states = [ck / f"deepgrpo_state_{r}.json" for r in range(2)]
        (out / "result.json").write_text(json.dumps({
            "aux_rows": [p["aux_rows"] for p in parts], "max_param_diff_between_ranks": between,
            "max_diff_to_single_process_step": max(diffs), "param_change": change,
            "state_ledgers": [len(json.loads(f.read_text())["ledger"]) for f in states],
            "pivots": [p["pivots"] for p in parts], "next_entropy_max": [p["next_entropy_max"] for p in parts],
            "estimator_points": [p["estimator_points"] for p in parts],
            "states_written_before_trainer_state": all(f.stat().st_mtime_ns < marked for f in states)}))
    finish_worker()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
