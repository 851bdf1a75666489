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

from deepgrpo.config import ConfigError
from deepgrpo.records import failpoint
from llm.models import check_model_dir, is_model_dir, save_pretrained_dir

STATE_FILE = "trainer_state.pt"


def rng_states(core_rng: np.random.Generator) -> dict[str, Any]:
    """Random states of Python, numpy (the core's Generator) and torch."""
    return {"python": random.getstate(), "numpy": core_rng.bit_generator.state,
            "torch": torch.get_rng_state()}


def restore_rng_states(states: dict[str, Any], core_rng: np.random.Generator) -> None:
    """Inverse of :func:`rng_states`."""
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
    failpoint("checkpoint-half-written")
    torch.save(state, tmp / f"{STATE_FILE}.part")
    os.replace(tmp / f"{STATE_FILE}.part", tmp / STATE_FILE)  # the state file marks a complete directory
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    failpoint("checkpoint-between-renames")
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def recover_interrupted(path: str | os.PathLike) -> None:
    """If a run died between the two renames of :func:`save_checkpoint`, put the newest
    complete checkpoint in place: the new one if it was fully written (its state file exists),
    else the previous one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        return
    if (tmp / STATE_FILE).is_file():
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    elif old.exists():
        os.replace(old, path)


def load_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The trainer state of checkpoint directory ``path`` (trusted local file: full unpickling);
    a corrupt file is a :class:`ConfigError` naming it."""
    f = Path(path) / STATE_FILE
    try:
        state = torch.load(f, weights_only=False)
    except Exception as e:  # noqa: BLE001 - a truncated pickle/zip raises many types
        raise ConfigError(f"--resume is invalid: {str(f)!r} is corrupt ({str(e).strip().splitlines()[0][:150]})",
                          owner="--resume", value=str(f)) from None
    missing = [k for k in ("step", "data_pos", "optimizer", "rows") if not isinstance(state, dict) or k not in state]
    if missing:
        raise ConfigError(f"--resume is invalid: {str(f)!r} is not a trainer state (no {', '.join(missing)})",
                          owner="--resume", value=str(f))
    return state


def has_checkpoint(path: str | os.PathLike) -> bool:
    """True if ``path`` holds a complete checkpoint (model directory and trainer state)."""
    return (Path(path) / STATE_FILE).is_file() and is_model_dir(path)


def check_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` if it is a complete checkpoint, else a :class:`ConfigError` naming the first
    missing or broken file: a run is never silently restarted from step 0."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"--resume is invalid: {str(p)!r} does not exist: the run has no checkpoint to resume "
                          "from (start it again without --resume, in a new --out)", owner="--resume", value=str(p))
    if not (p / STATE_FILE).is_file():
        raise ConfigError(f"--resume is invalid: {str(p / STATE_FILE)!r} is missing: the checkpoint is incomplete",
                          owner="--resume", value=str(p / STATE_FILE))
    check_model_dir(p, option="--resume")
    return p


def resolve_model_dir(path: str | os.PathLike) -> Path | None:
    """A loadable model directory for ``path``: ``path`` itself if it is a model directory
    (:func:`~llm.models.is_model_dir`), else ``path/checkpoint`` (a training run's output
    directory, whose own ``config.json`` is the run's); None if neither."""
    p = Path(path)
    for cand in (p, p / "checkpoint"):
        if is_model_dir(cand):
            return cand
    return None
