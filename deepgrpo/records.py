"""Run records: atomic writes of tables and JSON, and the provenance of a run."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
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


class Terminated(KeyboardInterrupt):
    """SIGTERM (what a cluster scheduler sends before it kills a job), raised where the process
    is, so that every path that handles Ctrl-C (keep the checkpoint, say what was kept) handles
    it too; the command then exits 143 instead of 130."""


TERMINATED = False
"""Whether this process received SIGTERM through :func:`terminate_like_ctrl_c`'s handler."""


def _raise_terminated(signum: int, frame: Any) -> None:
    global TERMINATED
    TERMINATED = True
    raise Terminated()


def terminate_like_ctrl_c() -> None:
    """Make SIGTERM raise :class:`Terminated` in the main thread (left alone where the process
    was started with SIGTERM ignored, or where a handler other than the default is set)."""
    import threading
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, _raise_terminated):
        signal.signal(signal.SIGTERM, _raise_terminated)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) and SIGTERM back for the duration of the block, then deliver the first
    that arrived to the handler it was meant for: a few renames that swap a checkpoint in, or a
    pool forking its workers (where Python prints and drops an exception raised in its fork
    hooks), are never cut in the middle by an interrupt. Outside the main thread, where handlers
    cannot be set, the block runs as it is."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            signal.raise_signal(caught[0])


def exit_code_of_interrupt() -> int:
    """128 + the signal that stopped the command: 143 after SIGTERM, 130 after Ctrl-C."""
    return 128 + (signal.SIGTERM if TERMINATED else signal.SIGINT)


# ------------------------------------------------------------------------------------------
# one writer per output directory

_LOCKS: dict[Path, Any] = {}  # resolved output directory -> its open, flock-ed lock file


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of output directory ``path``: ``.NAME.lock`` beside it (outside it, so that
    replacing the directory as a whole never drops its lock)."""
    p = Path(path).resolve()
    return p.parent / f".{p.name or 'root'}.lock"


def lock_output(path: str | os.PathLike, option: str = "--out") -> Path:
    """Take the one-writer lock of output directory ``path`` for this process (until
    :func:`release_output_locks` or the process ends; a kill -9 releases it too), then remove
    the temporary files that interrupted atomic writes left there. A directory another process
    holds is a :class:`~deepgrpo.config.ConfigError` naming ``option`` and that process.
    Taking a lock this process already holds is a no-op. Returns the resolved directory."""
    import fcntl

    from deepgrpo.config import ConfigError
    p = Path(path).resolve()
    if p in _LOCKS:
        return p
    lock = lock_path(p)
    lock.parent.mkdir(parents=True, exist_ok=True)
    f = open(lock, "a+")  # noqa: SIM115 - held open for as long as the lock is held
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read(200).strip() or "another process"
        f.close()
        raise ConfigError(f"{option} = {str(path)!r} is in use by {holder}: one process writes to a directory "
                          f"at a time; wait for it to finish or choose another {option}", owner=option,
                          value=str(path), allowed="a directory no other process is writing to") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} ({' '.join(sys.argv[:3])[:120]})\n")
        f.flush()
    except OSError as e:  # e.g. a full disk refuses the holder's line: name the lock file
        with contextlib.suppress(OSError):  # closing flushes the same refused line again
            f.close()
        raise OSError(e.errno, e.strerror, str(lock)) from e
    _LOCKS[p] = f
    remove_stale_temps(p)
    return p


def claim_output(path: str | os.PathLike, option: str = "--out") -> Path:
    """Make ``path`` this process's output directory before any work is done: it must be (or be
    able to become) a writable directory (:func:`check_writable_dir`) that no other process is
    writing to (:func:`lock_output`, held until the command ends). Returns ``Path(path)``."""
    check_writable_dir(path, option)
    lock_output(path, option)
    return Path(path)


def release_output_locks() -> None:
    """Release every output-directory lock this process holds."""
    import fcntl
    for f in _LOCKS.values():
        try:
            fcntl.flock(f, fcntl.LOCK_UN)
        finally:
            f.close()
    _LOCKS.clear()


def remove_stale_temps(path: str | os.PathLike) -> int:
    """Remove what interrupted atomic writes left in and beside output directory ``path``
    (``.NAME.*.tmp`` files and directories, ``.NAME.*.old`` directories): call it only while
    holding the directory's lock, when no write of this directory can be under way. Returns
    how many were removed."""
    p = Path(path)
    found = list(p.parent.glob(f".{p.name}.*.tmp")) + list(p.parent.glob(f".{p.name}.*.old"))
    if p.is_dir():
        found += [q for q in p.rglob(".*.tmp")] + [q for q in p.rglob(".*.old") if q.is_dir()]
    for q in found:
        if q.is_dir() and not q.is_symlink():
            shutil.rmtree(q, ignore_errors=True)
        else:
            q.unlink(missing_ok=True)
    return len(found)


def describe_os_error(e: OSError) -> str:
    """One line naming an operating-system failure and the path it hit (``no space left on
    device: /runs/x/metrics.jsonl``); where the error carries no path, the output directories
    this process was writing are named."""
    where = e.filename if e.filename is not None else None
    if where is None and _LOCKS:
        where = "under " + ", ".join(str(d) for d in _LOCKS)
    what = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}.get(
        e.errno, (e.strerror or str(e)).lower())
    tail = ("; free some space and rerun the same command to resume" if e.errno in (errno.ENOSPC, errno.EDQUOT)
            else "")
    return f"{what}: {where}{tail}" if where else f"{what}{tail}"


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and rename the temp file to ``path`` (same directory), so
    ``path`` is either absent, the old file, or the complete new one — never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; results should be readable like any other file
    return _commit(Path(tmp), path, lambda: write(Path(tmp)))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """:func:`atomic_write` of ``data`` in fewer system calls (for the many small files of a
    sweep, where the file system's cost dominates): the same temporary file (``.NAME.<random>.tmp``
    beside ``path``, mode 0644, removed on any failure), the same ``atomic-write`` failpoint
    before the rename, and a failed write names ``path``. Where the temporary file cannot be
    created (no directory yet, a name taken, no permission...), :func:`atomic_write` writes (or
    fails as it does)."""
    import secrets
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(5)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError:
        return atomic_write(path, lambda p: p.write_bytes(data))

    def write() -> None:
        try:
            os.fchmod(fd, 0o644)  # whatever the umask, as atomic_write
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)

    return _commit(tmp, path, write)


def _commit(tmp: Path, path: Path, write: Callable[[], None]) -> Path:
    """Run ``write`` (which fills ``tmp``), then rename ``tmp`` to ``path``; on any failure
    remove ``tmp`` and re-raise (an OSError without a file name gets ``path``'s)."""
    try:
        write()
        failpoint("atomic-write")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is None:  # a failed write() names no file: name the one being written
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
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
    if not str(path).strip():
        raise ConfigError(f"{option} is empty: name a directory (use . for the current one)", owner=option,
                          value=str(path), allowed="a directory path")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{option} = {str(path)!r} is invalid: it exists and is not a directory", owner=option,
                          value=str(path), allowed="a directory")
    probe = p
    while not probe.exists():
        probe = probe.parent
    reason = "is not a directory" if not probe.is_dir() else None
    if reason is None:
        try:  # a real write: permission bits say nothing to root, nor about a read-only mount
            with tempfile.TemporaryFile(dir=probe, prefix=".deepgrpo-probe."):
                pass
        except OSError as e:
            reason = f"cannot be written to ({(e.strerror or str(e)).lower()})"
    if reason is not None:
        raise ConfigError(f"{option} = {str(path)!r} is invalid: {str(probe)!r} {reason}",
                          owner=option, value=str(path), allowed="a writable directory")
    return p


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda p: p.write_text(text))


def json_safe(x: Any) -> Any:
    """``x`` with every value JSON can hold as it is: numpy/torch values through ``tolist``,
    paths as text, and NaN and ±infinity as ``null`` (``NaN``/``Infinity`` literals are not JSON)."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        return json_safe(x.tolist())
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float) and not (x - x == 0):  # NaN or ±inf
        return None
    return x


def json_line(obj: Any) -> str:
    """``obj`` as one line of strict JSON (:func:`json_safe`), for ``.jsonl`` logs."""
    return json.dumps(json_safe(obj), allow_nan=False)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted, strict JSON atomically (:func:`json_safe`)."""
    return write_text_atomic(path, json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


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
