"""Run records: atomic writes of tables and JSON, and the provenance of a run."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable


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
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
