"""Checkpoints of an RL run: a normal transformers model directory plus the trainer state.

Layout of ``RUN/checkpoint/``::

    config.json, model.safetensors, tokenizer*.json   the policy (loads with AutoModelForCausalLM)
    trainer_state.pt                                  step, data position, optimizer, estimator,
                                                      budget ledger, random states, metric history

The directory is written next to its final place and swapped in with renames, so a run killed
at any moment leaves either the previous complete checkpoint or the new one.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llm.models import is_model_dir, save_pretrained_dir

STATE_FILE = "trainer_state.pt"


def rng_states(core_rng: np.random.Generator) -> dict[str, Any]:
    """Random states of Python, numpy (the core's Generator) and torch."""
    return {"python": random.getstate(), "numpy": core_rng.bit_generator.state,
            "torch": torch.get_rng_state()}


def restore_rng_states(states: dict[str, Any], core_rng: np.random.Generator) -> None:
    random.setstate(states["python"])
    core_rng.bit_generator.state = states["numpy"]
    torch.set_rng_state(states["torch"])


def save_checkpoint(path: str | os.PathLike, model: Any, tokenizer: Any, state: dict[str, Any]) -> Path:
    """Write model + tokenizer + ``state`` (a picklable dict) to ``path`` atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained_dir(model, tokenizer, tmp)
    torch.save(state, tmp / STATE_FILE)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def recover_interrupted(path: str | os.PathLike) -> None:
    """If a run died between the two renames of :func:`save_checkpoint`, put the previous
    complete checkpoint back in place."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.exists():
        os.replace(old, path)


def load_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The trainer state of checkpoint directory ``path`` (trusted local file: full unpickling)."""
    return torch.load(Path(path) / STATE_FILE, weights_only=False)


def has_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / STATE_FILE).is_file() and is_model_dir(path)


def resolve_model_dir(path: str | os.PathLike) -> Path | None:
    """A loadable model directory for ``path``: ``path`` itself if it holds ``config.json``,
    else ``path/checkpoint`` (a training run's output directory); None if neither."""
    p = Path(path)
    for cand in (p, p / "checkpoint"):
        if is_model_dir(cand):
            return cand
    return None
