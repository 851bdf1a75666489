"""Faults of ``python -m llm.trl_trainer`` (``pytest -m faults``; real processes, micro model):

* SIGTERM (what a cluster scheduler sends) stops the run like Ctrl-C: one line naming the last
  complete checkpoint, exit 143, and the run continues from that checkpoint;
* a kill -9 inside a checkpoint save (while the DEEP-GRPO state is written, or after it and before
  TRL's files) never leaves a checkpoint that looks complete; ``--resume_from_checkpoint true``
  continues from the previous one with its estimator and budget ledgers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm.models import TinyModelConfig, build_char_tokenizer, build_tiny_model, save_pretrained_dir
from llm.tasks import DATA_DIR
from llm.trl_trainer import checkpoint_is_complete, last_complete_checkpoint

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[1]
MICRO = TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        max_position_embeddings=96)


def micro_dir(path: Path) -> Path:
    tok = build_char_tokenizer()
    return save_pretrained_dir(build_tiny_model(tok, MICRO, seed=0), tok, path)


def command(model: Path, out: Path, *extra: str) -> list[str]:
    """``python -m llm.trl_trainer`` on the arithmetic sample, a checkpoint after every step."""
    return [sys.executable, "-m", "llm.trl_trainer", "--model", str(model),
            "--data", str(DATA_DIR / "arith_sample.jsonl"), "--output_dir", str(out), "--num_generations", "4",
            "--per_device_train_batch_size", "8", "--max_completion_length", "16", "--segmenter", "step",
            "--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--disable_tqdm", "true",
            "--save_strategy", "steps", "--save_steps", "1", *extra]


def environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TRL_EXPERIMENTAL_SILENCE="1",
                OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT), **extra)


def ledger(checkpoint: Path) -> list[dict]:
    return json.loads((checkpoint / "deepgrpo_state_0.json").read_text())["ledger"]


def step_of(checkpoint: Path) -> int:
    return json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]


def test_sigterm_keeps_the_last_checkpoint_and_exits_143(tmp_path):
    model, out = micro_dir(tmp_path / "model"), tmp_path / "run"
    env = environment(tmp_path)
    proc = subprocess.Popen(command(model, out, "--max_steps", "100000"), env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while (last_complete_checkpoint(out) is None or step_of(last_complete_checkpoint(out)) < 2) \
                and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    m = re.fullmatch(r"python -m llm\.trl_trainer: terminated \(SIGTERM\); the last complete checkpoint is (\S+): "
                     r"continue with --resume_from_checkpoint (\S+)", last)
    assert m and m.group(1) == m.group(2), last
    kept = Path(m.group(1))
    assert kept == last_complete_checkpoint(out) and checkpoint_is_complete(kept)
    step = step_of(kept)
    assert len(ledger(kept)) == step
    # the run continues from the named checkpoint, its estimator and ledgers
    done = subprocess.run(command(model, out, "--max_steps", str(step + 1), "--resume_from_checkpoint", str(kept)),
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    after = out / f"checkpoint-{step + 1}"
    assert step_of(after) == step + 1
    assert ledger(after)[:step] == ledger(kept) and len(ledger(after)) == step + 1


@pytest.mark.parametrize("failpoint", ["atomic-write:2", "trl-checkpoint-state-written:2"])
def test_kill_during_a_checkpoint_save_never_leaves_it_looking_complete(tmp_path, failpoint):
    """kill -9 while checkpoint-2's DEEP-GRPO state is written (atomic-write), or after it and
    before TRL's files: checkpoint-2 has no trainer_state.json, so resuming takes checkpoint-1."""
    model, out = micro_dir(tmp_path / "model"), tmp_path / "run"
    killed = subprocess.run(command(model, out, "--max_steps", "3"), env=environment(tmp_path,
                            DEEPGRPO_FAILPOINT=failpoint), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-2" / "trainer_state.json").exists()
    assert last_complete_checkpoint(out) == out / "checkpoint-1"
    first = ledger(out / "checkpoint-1")
    done = subprocess.run(command(model, out, "--max_steps", "3", "--resume_from_checkpoint", "true"),
                          env=environment(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert checkpoint_is_complete(out / "checkpoint-2") and checkpoint_is_complete(out / "checkpoint-3")
    assert ledger(out / "checkpoint-3")[:1] == first and len(ledger(out / "checkpoint-3")) == 3
