"""Verifiable rewards: exact match (arithmetic), GSM8K's final-number rule, math-verify (MATH).

Every reward function takes the decoded response text and the reference answer and returns
1.0 or 0.0. None of them raises: malformed, empty, huge or adversarial text scores 0.
Truncated generations score 0 whatever their text (:func:`score`).
"""

from __future__ import annotations

import json
import math
import re
import sys
import threading
from collections.abc import Callable
from typing import Any

MAX_CHARS = 20_000
"""Longer responses are scored on their last MAX_CHARS characters (bounds regex/parse cost)."""

_INT = re.compile(r"-?\d+")
_NUMBER = re.compile(r"-?[0-9][0-9,]*(?:\.[0-9]+)?|-?\.[0-9]+")
_GSM8K_STRICT = re.compile(r"####\s*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")


def _tail(text: object) -> str:
    if not isinstance(text, str):
        return ""
    return text[-MAX_CHARS:]


def _canonical_number(s: str) -> str | None:
    """'1,234.50' -> '1234.5'; '007' -> '7'; None if not a number."""
    s = s.replace(",", "").strip().rstrip(".")
    try:
        if re.fullmatch(r"-?\d+", s):
            return str(int(s))
        v = float(s)
    except (ValueError, OverflowError):
        return None
    if v != v or v in (float("inf"), float("-inf")):
        return None
    return str(int(v)) if v.is_integer() else repr(v)


def arithmetic_reward(response: str, answer: str) -> float:
    """1 iff the text after the response's last ``;`` is exactly the reference integer
    (``...,25+74=99;99`` with answer ``99``). The steps are not checked; the final answer is."""
    try:
        text = _tail(response)
        if ";" not in text:
            return 0.0
        final = text.rsplit(";", 1)[1].strip()
        return float(bool(_INT.fullmatch(final)) and final == str(answer).strip())
    except Exception:  # never raise on model output
        return 0.0


def gsm8k_reward(response: str, answer: str, mode: str = "strict") -> float:
    """GSM8K's final-number rule.

    ``strict`` (the reference runs): the number after the *last* ``####`` must equal the
    reference number (commas and a trailing period ignored, ``1.0`` == ``1``).
    ``flexible``: the last number anywhere in the response.
    """
    if mode not in ("strict", "flexible"):
        raise ValueError(f"gsm8k mode {mode!r} is invalid: expected strict or flexible")
    try:
        text = _tail(response)
        found = (_GSM8K_STRICT if mode == "strict" else _NUMBER).findall(text)
        if not found:
            return 0.0
        got = _canonical_number(found[-1])
        ref = _canonical_number(str(answer))
        return float(got is not None and got == ref)
    except Exception:  # never raise on model output
        return 0.0


MATH_VERIFY_TIMEOUT_S = 5
"""Seconds math-verify may spend on one response (parsing and comparison)."""


def _math_verify(response: str, answer: str, timeout_s: int = MATH_VERIFY_TIMEOUT_S) -> float:
    """math-verify on the calling thread, which must be a main thread (its timeouts use signals)."""
    try:
        from math_verify import parse, verify

        text = _tail(response)
        if not text.strip():
            return 0.0
        gold = parse("\\boxed{" + str(answer) + "}", parsing_timeout=timeout_s)
        pred = parse(text, parsing_timeout=timeout_s)
        if not gold or not pred:
            return 0.0
        return float(bool(verify(gold, pred, timeout_seconds=timeout_s)))
    except ImportError:
        raise
    except BaseException as e:  # sympy/timeout errors on adversarial text; never propagate
        if isinstance(e, KeyboardInterrupt):
            raise
        return 0.0


class MathVerifyProcess:
    """A child process that runs math-verify on *its* main thread, for callers on other threads.

    math-verify bounds its work with ``signal.alarm``, which only works on a process's main
    thread; called from a worker thread (as TRL and verl call rewards) it raises, and a reward
    that swallowed the error would silently score 0. This process answers one request per line
    (JSON in, a score out); the caller waits at most ``timeout_s`` (plus a start-up allowance on
    the first call) and, past it, kills the child, scores 0 and starts a new child next time —
    so the timeout holds whatever math-verify does.
    """

    STARTUP_S = 60.0

    def __init__(self) -> None:
        self.proc: Any = None

    def _start(self) -> None:
        import subprocess
        self.proc = subprocess.Popen([sys.executable, "-m", "llm.rewards", "--math-verify-worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, bufsize=1)
        if self._readline(self.STARTUP_S) != "ready":
            self.close()
            raise RuntimeError("the math-verify worker process did not start (is math-verify installed?)")

    def _readline(self, timeout_s: float) -> str | None:
        import select
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            return None
        return self.proc.stdout.readline().strip()

    def score(self, response: str, answer: str, timeout_s: float = MATH_VERIFY_TIMEOUT_S) -> float:
        """The math-verify reward, computed in the child; 0 if it takes longer than ``timeout_s``."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps([_tail(response), str(answer), max(int(math.ceil(timeout_s)), 1)]) + "\n")
        self.proc.stdin.flush()
        line = self._readline(timeout_s + 1.0)
        if line is None:  # past the deadline: the child may be stuck in sympy
            self.close()
            return 0.0
        try:
            return float(line)
        except ValueError:
            self.close()
            return 0.0

    def close(self) -> None:
        """Stop the child process."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


_WORKERS = threading.local()


def math_reward(response: str, answer: str, timeout_s: float = MATH_VERIFY_TIMEOUT_S) -> float:
    """``math-verify``: parse the response's final answer (the last ``\\boxed{}`` first, else
    other LaTeX/expression forms) and check mathematical equivalence with the reference.

    Works from any thread with the same bound on its time: on the main thread math-verify's own
    (signal-based) timeout applies; on another thread the work runs in a per-thread child
    process (:class:`MathVerifyProcess`) that is killed past ``timeout_s``.
    """
    if threading.current_thread() is threading.main_thread():
        return _math_verify(response, answer, max(int(math.ceil(timeout_s)), 1))
    worker = getattr(_WORKERS, "worker", None)
    if worker is None:
        worker = _WORKERS.worker = MathVerifyProcess()
    return worker.score(response, answer, timeout_s)


def _math_verify_worker() -> None:
    """The child's loop: ``[response, answer, timeout]`` JSON lines in, scores out."""
    import math_verify  # noqa: F401 - import once before saying ready
    print("ready", flush=True)
    for line in sys.stdin:
        response, answer, timeout_s = json.loads(line)
        print(_math_verify(response, answer, int(timeout_s)), flush=True)


REWARDS: dict[str, Callable[[str, str], float]] = {
    "arith": arithmetic_reward,
    "gsm8k": gsm8k_reward,
    "math": math_reward,
}
"""Task name -> reward function (response text, reference answer) -> {0.0, 1.0}."""


def score(task: str, response: str, answer: str, truncated: bool = False) -> float:
    """The reward of ``response`` for ``task``; 0 if ``truncated``."""
    if truncated:
        return 0.0
    fn = REWARDS.get(task)
    if fn is None:
        raise ValueError(f"task {task!r} is invalid: expected one of {', '.join(REWARDS)}")
    return fn(response, answer)


if __name__ == "__main__" and sys.argv[1:] == ["--math-verify-worker"]:
    _math_verify_worker()
