"""Wall time of one DeepGRPOTrainer step against one plain TRL GRPOTrainer step at the same
number of generated tokens.

    python benchmarks/bench_trl_step.py [--steps 6] [--G 8] [--K 8] [--prompts 4] [--threads 1]

Both trainers start from the same briefly SFT'd micro Llama (character tokenizer, built from a
config: nothing downloaded) on the arithmetic task, with transformers generation on the CPU.
DEEP-GRPO (G main chains + K branches per failed chain) runs first; its mean generated tokens
per step (main + branch suffixes) set the group size N of the plain GRPO run, N = G x (tokens
per step / main-chain tokens per step), rounded to an even number, so that both generate about
the same number of tokens per step. The first step of each run is a warm-up and is not timed.

Prints, from one run: mean step wall time and process CPU time (one optimizer step: generation,
scoring, the exploration step, log-prob passes, loss, backward and optimizer), mean generated
tokens per step, and the ratios DEEP / GRPO of step time and of step time per generated token.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from statistics import mean

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def reward_fn(completions, answer, **_):
    from llm.rewards import arithmetic_reward
    return [arithmetic_reward(c, a) for c, a in zip(completions, answer)]


def step_timer():
    """A TrainerCallback recording each optimizer step's wall and process CPU time (s)."""
    import time

    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.wall: list[float] = []
            self.cpu: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self._t = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kw):
            self.wall.append(time.perf_counter() - self._t[0])
            self.cpu.append(time.process_time() - self._t[1])
    return StepTimer()


def run(trainer_cls, config_cls, path: Path, tok, ds, out: Path, steps: int, **kw) -> tuple[list[dict], object]:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    args = config_cls(output_dir=str(out), report_to="none", save_strategy="no", use_cpu=True, bf16=False,
                      logging_steps=1, max_steps=steps, learning_rate=3e-4, lr_scheduler_type="constant",
                      max_completion_length=32, beta=0.0, seed=0, disable_tqdm=True, **kw)
    trainer = trainer_cls(model=str(path), reward_funcs=reward_fn, args=args, train_dataset=ds, processing_class=tok)
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    timer = step_timer()
    trainer.add_callback(timer)
    trainer.train()
    return [h for h in trainer.state.log_history if "step_time" in h], timer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--K", type=int, default=8)
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(a.threads)
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from llm.models import TinyModelConfig, build_char_tokenizer, build_tiny_model, save_pretrained_dir
    from llm.tasks import ArithmeticConfig, ArithmeticStream
    from llm.testing import memorize
    from llm.trl_trainer import DeepGRPOConfig, DeepGRPOTrainer

    tok = build_char_tokenizer()
    model = build_tiny_model(tok, TinyModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                  num_attention_heads=4, max_position_embeddings=96), seed=0)
    stream = ArithmeticStream(ArithmeticConfig(min_terms=2, max_terms=3, max_digits=1), seed=0)
    problems = [stream.problem_at(i) for i in range(64)]
    memorize(model, tok, problems, steps=60)
    ds = Dataset.from_dict({"prompt": [q.question for q in problems], "answer": [q.answer for q in problems]})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = save_pretrained_dir(model, tok, tmp / "model")
        deep, deep_t = run(DeepGRPOTrainer, DeepGRPOConfig, path, tok, ds, tmp / "deep", a.steps,
                           num_generations=a.G, K=a.K, per_device_train_batch_size=a.prompts * a.G, segmenter="step")
        deep = deep[1:]
        tokens_deep = mean(h["step_tokens_main"] + h["step_tokens_aux"] for h in deep)
        tokens_main = mean(h["step_tokens_main"] for h in deep)
        N = max(2, 2 * round(a.G * tokens_deep / tokens_main / 2))
        grpo, grpo_t = run(GRPOTrainer, GRPOConfig, path, tok, ds, tmp / "grpo", a.steps, num_generations=N,
                           per_device_train_batch_size=a.prompts * N)
        grpo = grpo[1:]
        tokens_grpo = mean(h["completions/mean_length"] * a.prompts * N for h in grpo)
    t_deep, t_grpo = mean(deep_t.wall[1:]), mean(grpo_t.wall[1:])
    c_deep, c_grpo = mean(deep_t.cpu[1:]), mean(grpo_t.cpu[1:])
    print(f"DEEP-GRPO G={a.G} K={a.K}: {t_deep:.3f} s/step wall, {c_deep:.3f} s/step CPU, "
          f"{tokens_deep:.0f} generated tokens/step "
          f"({tokens_main:.0f} main + {tokens_deep - tokens_main:.0f} branch), "
          f"{mean(h['step_rollouts_aux'] for h in deep):.1f} branch rollouts/step")
    print(f"GRPO N={N}: {t_grpo:.3f} s/step wall, {c_grpo:.3f} s/step CPU, {tokens_grpo:.0f} generated tokens/step")
    for kind, d, g in (("wall", t_deep, t_grpo), ("CPU", c_deep, c_grpo)):
        print(f"ratio DEEP/GRPO ({kind} time): per step {d / g:.2f}, per generated token "
              f"{(d / tokens_deep) / (g / tokens_grpo):.2f}")
    print(f"({a.steps - 1} timed steps each, {a.prompts} prompts/step, {a.threads} thread(s); "
          "wall time is inflated by other processes on a shared machine, CPU time much less)")


if __name__ == "__main__":
    main()
