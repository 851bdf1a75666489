"""Verifiable rewards: exact match (arithmetic), GSM8K's final-number rule, math-verify (MATH).

Every reward function takes the decoded response text and the reference answer and returns
1.0 or 0.0. None of them raises: malformed, empty, huge or adversarial text scores 0.
Truncated generations score 0 whatever their text (:func:`score`).

The answer extractors here are shared with the data loaders (:mod:`llm.tasks`), so a reference
answer and a model's answer are read by the same rule: :func:`gsm8k_extract` and
:func:`gsm8k_value` for GSM8K, :func:`last_boxed` and :func:`math_final_answer` for MATH.
"""

from __future__ import annotations

import json
import math
import re
import sys
import threading
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any

MAX_CHARS = 20_000
"""Longer responses are scored on their last MAX_CHARS characters (bounds regex/parse cost)."""

_INT = re.compile(r"-?\d+")


def _tail(text: object) -> str:
    if not isinstance(text, str):
        return ""
    return text[-MAX_CHARS:]


# ----------------------------------------------------------------------------------------------
# GSM8K answers
# ----------------------------------------------------------------------------------------------

_NUMBER_TOKEN = r"\$?-?\$?(?:\d|\.\d)[\d.,/]*(?:[eE][+-]?\d+)?"
"""A number-like run of text: an optional dollar sign and minus, digits with any ``.``, ``,``
and ``/`` in between, and an exponent if one follows. It is deliberately wider than a valid GSM8K
number, so that ``1.5e3`` or ``1/2/3`` are read whole (and refused by :func:`gsm8k_value`)
rather than cut down to a valid-looking prefix such as ``1.5``."""
_GSM8K_MARKED = re.compile(r"####\s*(" + _NUMBER_TOKEN + ")")
_GSM8K_ANY = re.compile(_NUMBER_TOKEN)
_GSM8K_FORM = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+|\d+/\d+)")
"""A GSM8K number once ``$`` and commas are gone: an integer, a decimal or a fraction ``a/b``."""


def gsm8k_clean(token: str) -> str | None:
    """The number text of ``token`` as GSM8K's grader writes it, or None if it is not a number.

    Dollar signs and commas are removed and a trailing sentence period is dropped
    (``$1,000.`` -> ``1000``, ``-$5`` -> ``-5``); what is left must be an integer, a decimal or
    a fraction of integers (``12``, ``-0.5``, ``1/2``). Scientific notation (``1.5e3``) is
    refused: GSM8K answers never use it, and reading ``1.5e3`` as ``1.5`` (what a prefix regex
    does) would be silently wrong.
    """
    if not isinstance(token, str):
        return None
    s = token.strip().rstrip(".,").replace("$", "").replace(",", "")
    return s if _GSM8K_FORM.fullmatch(s) else None


def gsm8k_value(number: object) -> Fraction | None:
    """The exact value of a GSM8K number (``"1,000"``, ``"$5"``, ``"0.50"``, ``"1/2"``), or None.

    Values are exact rationals, so ``1,000`` == ``1000``, ``5`` == ``5.0``, ``0.5`` == ``1/2``,
    and ``0`` is a value like any other. None for anything :func:`gsm8k_clean` refuses, a zero
    denominator, or a number too long to convert.
    """
    s = gsm8k_clean(number) if isinstance(number, str) else None
    if s is None:
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


def gsm8k_extract(text: object, mode: str = "strict") -> str | None:
    """The final answer of a GSM8K text as a cleaned number string (:func:`gsm8k_clean`), or None.

    ``strict`` (GSM8K's own rule, as in grade-school-math, lm-eval-harness and verl): the number
    right after the last ``####`` that is followed by one (spaces, a ``$`` and a minus sign
    allowed in between). ``flexible``: the last number anywhere in the text.
    The number is read whole and then checked: ``#### 1/2`` is ``1/2`` (not ``1``),
    ``#### 1.5e3`` is None (not ``1.5``); text after the number (``#### 12 eggs``) is ignored.
    The same rule reads reference answers (:func:`llm.tasks.gsm8k_final_answer`) and responses.
    """
    if mode not in ("strict", "flexible"):
        raise ValueError(f"gsm8k mode {mode!r} is invalid: expected strict or flexible")
    if not isinstance(text, str):
        return None
    found = (_GSM8K_MARKED if mode == "strict" else _GSM8K_ANY).findall(text)
    return gsm8k_clean(found[-1]) if found else None


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
    """GSM8K's final-number rule, compared exactly.

    The response's final answer (:func:`gsm8k_extract`: in ``strict`` mode, the reference runs',
    the number after the last ``####``; in ``flexible`` mode, the last number anywhere) must
    have the same value as the reference number ``answer`` (:func:`gsm8k_value`): commas, ``$``
    and a trailing period are ignored and values compare as exact rationals, so ``#### 3,000``
    matches ``3000``, ``#### 52.50`` matches ``52.5`` and ``#### 1/2`` matches ``0.5``. A number
    in scientific notation, or a reference that is not a number, scores 0.
    """
    if mode not in ("strict", "flexible"):
        raise ValueError(f"gsm8k mode {mode!r} is invalid: expected strict or flexible")
    try:
        got = gsm8k_value(gsm8k_extract(_tail(response), mode))
        ref = gsm8k_value(str(answer).strip())
        return float(got is not None and ref is not None and got == ref)
    except Exception:  # never raise on model output
        return 0.0


# ----------------------------------------------------------------------------------------------
# MATH answers
# ----------------------------------------------------------------------------------------------

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BOX_SPACE_END = re.compile(r"[$\n]")


def _group_end(text: str, i: int) -> int | None:
    """For ``text[i] == "{"``: the index just past its matching ``}``, or None if it never closes.
    Escaped characters (``\\{``, ``\\}``, ``\\\\``) are not braces."""
    depth = 0
    j = i
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return None


def _top_level_boxes(text: str) -> Iterator[tuple[int, int, str | None]]:
    """(start, end, content) of each top-level box of ``text``, left to right.

    A box is ``\\boxed{...}`` or ``\\fbox{...}`` with balanced braces, or ``\\boxed ...`` (a
    space, then the text up to the next ``$`` or line end). Boxes inside a box are part of its
    content, not boxes of their own. A box whose braces never close runs to the end of the text
    and has content None.
    """
    pos = 0
    while True:
        m = _BOX.search(text, pos)
        if m is None:
            return
        k = m.end()
        while k < len(text) and text[k] in " \t":
            k += 1
        if k < len(text) and text[k] == "{":
            end = _group_end(text, k)
            if end is None:
                yield m.start(), len(text), None
                return
            yield m.start(), end, text[k + 1:end - 1]
            pos = end
        elif k > m.end() and text.startswith("\\boxed", m.start()):
            stop = _BOX_SPACE_END.search(text, k)
            end = stop.start() if stop else len(text)
            yield m.start(), end, text[k:end].strip()
            pos = end
        else:  # "\boxed" not followed by a group or a space: not a box
            pos = m.end()


def last_boxed(text: object) -> str | None:
    """Content of the last top-level box of ``text``, or None; never raises.

    As MATH's ``last_boxed_only_string`` + ``remove_boxed``: ``\\boxed{...}`` and ``\\fbox{...}``
    with balanced braces, and ``\\boxed 5`` (up to the next ``$``; here also up to the line end).
    Unlike MATH's (and math-verify's) search for the last ``\\boxed`` string, a box nested in
    another is part of the outer box: ``\\boxed{\\frac{1}{\\boxed{2}}}`` -> ``\\frac{1}{\\boxed{2}}``.
    If the last box never closes (a cut-off answer), None.
    """
    if not isinstance(text, str):
        return None
    boxes = list(_top_level_boxes(text))
    return boxes[-1][2] if boxes else None


def unbox(text: str) -> str:
    """``text`` with every box command removed and its content kept (``\\frac{1}{\\boxed{2}}``
    -> ``\\frac{1}{2}``): a box inside an answer is typesetting, not a second answer.
    One pass over the text (no recursion, so deeply nested boxes cost no more than flat ones)."""
    out: list[str] = []
    braces: list[bool] = []  # for each open brace: does it open a box?
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            m = _BOX.match(text, i)
            if m is None:
                out.append(text[i:i + 2])
                i += 2
                continue
            k = m.end()
            while k < len(text) and text[k] in " \t":
                k += 1
            if k < len(text) and text[k] == "{":
                braces.append(True)
                k += 1
            i = k  # "\\boxed 5": the command goes, its argument stays
            continue
        if c == "{":
            braces.append(False)
        elif c == "}" and braces and braces.pop():
            i += 1
            continue
        out.append(c)
        i += 1
    return "".join(out)


def math_final_answer(text: object) -> str | None:
    """The final answer of a MATH solution or response: the content of its last top-level box
    (:func:`last_boxed`) with nested boxes unwrapped (:func:`unbox`), or None."""
    content = last_boxed(text)
    return None if content is None else unbox(content)


MATH_VERIFY_TIMEOUT_S = 5
"""Seconds math-verify may spend on one response (parsing and comparison)."""


def _math_verify(response: str, answer: str, timeout_s: int = MATH_VERIFY_TIMEOUT_S) -> float:
    """math-verify on the calling thread, which must be a main thread (its timeouts use signals)."""
    try:
        from math_verify import parse, verify

        text = _tail(response)
        if not text.strip():
            return 0.0
        boxes = list(_top_level_boxes(text))
        if boxes and boxes[-1][2] is None:  # the final box never closes: a cut-off answer
            return 0.0
        gold = parse("\\boxed{" + unbox(str(answer)) + "}", parsing_timeout=timeout_s)
        pred = parse("\\boxed{" + unbox(boxes[-1][2]) + "}" if boxes else text, parsing_timeout=timeout_s)
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
    """MATH's rule with ``math-verify``: the response's final answer is the content of its last
    top-level box (:func:`math_final_answer`; ``\\boxed{}``, ``\\boxed 5`` or ``\\fbox{}``,
    nested boxes unwrapped), or, without a box, what math-verify finds (a stated final answer,
    else the last expression); it scores 1 iff math-verify finds it mathematically equivalent to
    the reference (``0.5`` == ``\\frac{1}{2}``, ``(x+1)^2`` == ``x^2+2x+1``). A response whose
    last box never closes scores 0 (as in MATH's grader), whatever boxes come before it.

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
