"""Checkpoints of an RL run: a normal transformers model directory plus the trainer state.

Layout of ``RUN/checkpoint/``::

    config.json, model.safetensors, tokenizer*.json   the policy (loads with AutoModelForCausalLM)
    trainer_state.pt                                  step, data position, optimizer, estimator,
                                                      budget ledger, random states, metric history,
                                                      the run's resolved config

``trainer_state.pt`` holds only tensors and plain values (numbers, text, lists, dicts), so it
loads with ``torch.load(..., weights_only=True)``: nothing in it is code, and a file crafted to
run code when unpickled is refused instead of loaded.

A save writes a hidden temporary directory (``.checkpoint.XXXX.tmp``: a save cut short leaves
only that, which the next run removes), renames it to ``.checkpoint.new`` once complete, then
swaps it in (``checkpoint`` -> ``.checkpoint.prev``, ``.checkpoint.new`` -> ``checkpoint``). A
run killed at any moment leaves a complete checkpoint under one of those names, and
:func:`recover_interrupted` puts the newest back in place. Ctrl-C and SIGTERM are held back
during the swap, so they never land between its renames.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepgrpo.config import ConfigError
from deepgrpo.records import failpoint, signals_held
from llm.models import check_model_dir, is_model_dir, named_os_error, no_space_left, save_pretrained_dir

STATE_FILE = "trainer_state.pt"


def _sibling(path: Path, tag: str) -> Path:
    """``.NAME.TAG`` beside ``path``: the complete new checkpoint (``new``) and the previous one
    during a swap (``prev``). Neither matches the ``.*.tmp`` / ``.*.old`` patterns of
    :func:`deepgrpo.records.remove_stale_temps`, which must not remove a complete checkpoint."""
    return path.with_name(f".{path.name}.{tag}")


def rng_states(core_rng: np.random.Generator) -> dict[str, Any]:
    """Random states of Python (``[version, [625 ints], gauss]``), numpy (the core's Generator:
    a dict of ints) and torch (a uint8 tensor): plain values and tensors only."""
    version, internal, gauss = random.getstate()
    return {"python": [version, list(internal), gauss], "numpy": core_rng.bit_generator.state,
            "torch": torch.get_rng_state()}


def restore_rng_states(states: dict[str, Any], core_rng: np.random.Generator) -> None:
    """Inverse of :func:`rng_states`."""
    version, internal, gauss = states["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    core_rng.bit_generator.state = tensors_to_numpy(states["numpy"])
    torch.set_rng_state(states["torch"])


def plain_state(obj: Any, where: str = "state") -> Any:
    """``obj`` made of what ``torch.load(weights_only=True)`` accepts: numpy arrays become
    tensors (same dtype and values), numpy scalars Python numbers, tuples stay tuples; dicts,
    lists, tensors, numbers, text, bytes and None are kept. Anything else is a TypeError naming
    where it is (a bug: a trainer state must never need unpickling of code)."""
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj).copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: plain_state(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [plain_state(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return tuple(items) if isinstance(obj, tuple) else items
    raise TypeError(f"{where} is a {type(obj).__name__}: a trainer state holds only tensors and plain values")


def tensors_to_numpy(obj: Any) -> Any:
    """``obj`` with every tensor turned back into a numpy array (for states that numpy code
    restores, such as an estimator's buffers)."""
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return {k: tensors_to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [tensors_to_numpy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(tensors_to_numpy(v) for v in obj)
    return obj


def _write_state(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` of ``state`` (made plain, :func:`plain_state`) to ``path``; a full disk is
    an ``OSError`` (ENOSPC) naming ``path``, not the serializer's opaque error."""
    try:
        with open(path, "wb") as f:
            torch.save(plain_state(state), f)
    except OSError as e:
        raise named_os_error(e, path) from None
    except Exception as e:
        if no_space_left(path, e):  # torch reports a failed write as a RuntimeError raised from the OSError
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise


def save_checkpoint(path: str | os.PathLike, model: Any, tokenizer: Any, state: dict[str, Any],
                    committed: Callable[[], None] | None = None) -> Path:
    """Write model + tokenizer + ``state`` (tensors and plain values, see :func:`plain_state`)
    to ``path`` atomically (see the module docstring). ``committed`` is called as soon as the
    new checkpoint is in place, before a held-back Ctrl-C is delivered, so a caller can record
    what was saved. A failure (disk full included) removes what it wrote and leaves the previous
    checkpoint; an operating-system error names the file or directory it hit."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new, prev = _sibling(path, "new"), _sibling(path, "prev")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        save_pretrained_dir(model, tokenizer, tmp)
        failpoint("checkpoint-half-written")
        _write_state(tmp / STATE_FILE, state)  # written last: a directory with it is complete
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is read like any model directory
        with signals_held():
            shutil.rmtree(new, ignore_errors=True)
            os.replace(tmp, new)
            if path.exists():
                shutil.rmtree(prev, ignore_errors=True)
                os.replace(path, prev)
            failpoint("checkpoint-between-renames")
            os.replace(new, path)
            if committed is not None:
                committed()
    except OSError as e:  # named by the checkpoint, not by the hidden temporary directory it was written in
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(e.errno, e.strerror, str(path)) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(prev, ignore_errors=True)
    return path


def recover_interrupted(path: str | os.PathLike) -> None:
    """Put the newest complete checkpoint at ``path`` after a run died in the middle of
    :func:`save_checkpoint`'s swap: ``.NAME.new`` (complete by construction) if it exists, else
    the checkpoint in place, else ``.NAME.prev``; leftovers are removed. Call it while holding
    the run directory's lock."""
    path = Path(path)
    new, prev = _sibling(path, "new"), _sibling(path, "prev")
    if new.is_dir() and (new / STATE_FILE).is_file():
        if path.exists():
            shutil.rmtree(prev, ignore_errors=True)
            os.replace(path, prev)
        os.replace(new, path)
    elif not path.exists() and prev.is_dir():
        os.replace(prev, path)
    for leftover in (new, prev):
        shutil.rmtree(leftover, ignore_errors=True)


def load_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The trainer state of checkpoint directory ``path``, loaded with
    ``torch.load(weights_only=True)`` (tensors and plain values only: nothing is executed). A
    file that holds anything else (a pickle that would run code, or a checkpoint written before
    states were plain) is refused, and a corrupt file is a :class:`ConfigError` naming it."""
    f = Path(path) / STATE_FILE
    try:
        state = torch.load(f, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        detail = next((line.strip() for line in str(e).splitlines()
                       if "GLOBAL" in line or "Unsupported" in line or "unsupported" in line), "")
        raise ConfigError(f"--resume is invalid: {str(f)!r} holds objects other than tensors and plain values "
                          f"({detail[:150] or 'not a plain trainer state'}); it was not loaded, since unpickling it "
                          "could run code: resume only from checkpoints written by this version of deepgrpo llm train",
                          owner="--resume", value=str(f)) from None
    except Exception as e:  # noqa: BLE001 - a truncated zip or pickle raises many types
        first = str(e).strip().splitlines()[0][:150] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--resume is invalid: {str(f)!r} is corrupt ({first})",
                          owner="--resume", value=str(f)) from None
    missing = [k for k in ("step", "data_pos", "optimizer", "rows", "config")
               if not isinstance(state, dict) or k not in state]
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

