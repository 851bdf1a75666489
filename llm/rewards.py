"""Verifiable rewards: exact match (arithmetic), GSM8K's final-number rule, math-verify (MATH).

Every reward function takes the decoded response text and the reference answer and returns
1.0 or 0.0. None of them raises: malformed, empty, huge or adversarial text scores 0.
Truncated generations score 0 whatever their text (:func:`score`).
"""

from __future__ import annotations

import re
from typing import Callable

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


def math_reward(response: str, answer: str) -> float:
    """``math-verify``: parse the response's final answer (the last ``\\boxed{}`` first, else
    other LaTeX/expression forms) and check mathematical equivalence with the reference."""
    try:
        from math_verify import parse, verify

        text = _tail(response)
        if not text.strip():
            return 0.0
        gold = parse("\\boxed{" + str(answer) + "}")
        pred = parse(text)
        if not gold or not pred:
            return 0.0
        return float(bool(verify(gold, pred)))
    except ImportError:
        raise
    except BaseException as e:  # sympy/timeout errors on adversarial text; never propagate
        if isinstance(e, KeyboardInterrupt):
            raise
        return 0.0


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
