"""Run records: atomic writes of tables and JSON, and the provenance of a run."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

FAILPOINT_ENV = "DEEPGRPO_FAILPOINT"
"""Environment variable naming a :func:`failpoint` at which the process kills itself (SIGKILL),
for the fault-injection tests (``pytest -m faults``); unset in normal use."""


_FAILPOINT_HITS: dict[str, int] = {}


def failpoint(name: str) -> None:
    """Kill this process with SIGKILL here if ``$DEEPGRPO_FAILPOINT`` is ``name`` (first time
    this point is reached) or ``name:N`` (N-th time): the tests use it to die in the middle of a
    save, between the steps that make the save atomic."""
    spec = os.environ.get(FAILPOINT_ENV)
    if not spec or spec.split(":")[0] != name:
        return
    _FAILPOINT_HITS[name] = _FAILPOINT_HITS.get(name, 0) + 1
    if _FAILPOINT_HITS[name] == int(spec.split(":")[1] if ":" in spec else 1):
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C (SIGINT) caught by a command, carrying what was saved (the message), so the
    command line can say it in one line."""


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and rename the temp file to ``path`` (same directory), so
    ``path`` is either absent, the old file, or the complete new one — never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; results should be readable like any other file
    try:
        write(Path(tmp))
        failpoint("atomic-write")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_directory(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` and put the finished directory at ``path`` by renames, so that
    ``path`` is absent, the old directory, or the complete new one — never half-written. An
    existing ``path`` is replaced (the caller decides whether that is allowed)."""
    import shutil
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        write(tmp)
        failpoint("atomic-directory")
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "previous")
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(path, 0o755)
    return path


def check_writable_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """``Path(path)`` if it is (or can become) a writable directory, else a
    :class:`~deepgrpo.config.ConfigError` naming ``option``: checked before any work is done."""
    from deepgrpo.config import ConfigError
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{option} = {str(path)!r} is invalid: it exists and is not a directory", owner=option,
                          value=str(path), allowed="a directory")
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} = {str(path)!r} is invalid: {str(probe)!r} is not a writable directory",
                          owner=option, value=str(path), allowed="a writable directory")
    return p


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda p: p.write_text(text))


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float) and x != x:
        return None
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON atomically (numpy/torch values via ``tolist``)."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def write_csv_atomic(path: str | os.PathLike, frame: Any) -> Path:
    """Write a pandas DataFrame as CSV atomically."""
    return atomic_write(path, lambda p: frame.to_csv(p, index=False))


def versions() -> dict[str, str]:
    """Versions of Python, the platform and the numeric libraries in use."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for mod in ("deepgrpo", "numpy", "torch", "scipy", "pandas", "gymnasium", "transformers", "vllm"):
        m = sys.modules.get(mod)
        if m is None and mod in ("deepgrpo", "numpy", "torch"):
            m = __import__(mod)
        if m is not None:
            out[mod] = str(getattr(m, "__version__", "unknown"))
    return out
