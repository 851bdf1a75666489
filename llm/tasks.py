"""Tasks and data: the synthetic arithmetic task, GSM8K- and MATH-format loaders, prompt templates,
and deterministic problem streams (position -> problem) for resumable training.

Task names: ``arith`` (built in, chain-of-thought addition chains), ``gsm8k`` (``question``,
``answer`` ending in ``#### N``), ``math`` (``problem``, ``solution`` with ``\\boxed{}``).
Files are local JSONL or parquet, read through HF ``datasets``. Reference answers are read by the
same rules as model responses (:mod:`llm.rewards`).
"""

from __future__ import annotations

import json
import os
import re
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deepgrpo.config import ConfigError, check_choice, check_range
from llm.rewards import gsm8k_extract, gsm8k_value, math_final_answer
from llm.rewards import last_boxed as last_boxed  # re-exported: the package's one box reader

TASKS = ("arith", "gsm8k", "math")

GSM8K_INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
"""Suffix the reference GSM8K runs append to each question (as in verl's GSM8K preprocessing)."""
MATH_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
"""Suffix the reference MATH runs append to each problem."""

DATA_DIR = Path(__file__).parent / "data"
"""Small sample files shipped with the package (written for the tests)."""


@dataclass(frozen=True)
class Problem:
    """One verifiable problem.

    id: stable identifier (file row or the arithmetic question itself).
    question: the problem text (without instruction or chat formatting).
    answer: the reference final answer (a number for arith/gsm8k, a LaTeX expression for math).
    task: one of :data:`TASKS` (selects the prompt template and the reward rule).
    solution: a worked solution when known (used as the SFT target for ``arith``).
    """

    id: str
    question: str
    answer: str
    task: str
    solution: str | None = None


# ----------------------------------------------------------------------------------------------
# The arithmetic task
# ----------------------------------------------------------------------------------------------

@dataclass
class ArithmeticConfig:
    """Addition chains with chain-of-thought steps (the ``tiny-arith`` task).

    ``14+0+11+74=`` is answered ``14+0=14,14+11=25,25+74=99;99``: one step per addition
    (separated by ``,``, a natural segment end for pivots), then ``;`` and the final answer.

    min_terms: fewest terms of a question (the number of terms is drawn uniformly in
        [min_terms, max_terms]; a difficulty knob).
    max_terms: most terms of a question.
    min_digits: fewest digits of an operand (drawn uniformly per operand in [min_digits,
        max_digits]; a difficulty knob).
    max_digits: most digits of an operand.
    heldout_mod: a question is held out (never trained on) iff crc32(question) % heldout_mod == 0.
    """

    min_terms: int = 3
    max_terms: int = 5
    min_digits: int = 1
    max_digits: int = 2
    heldout_mod: int = 10

    def __post_init__(self) -> None:
        o = type(self).__name__
        check_range(o, "min_terms", self.min_terms, 2, None, integer=True)
        check_range(o, "max_terms", self.max_terms, self.min_terms, None, integer=True)
        check_range(o, "min_digits", self.min_digits, 1, 9, integer=True)
        check_range(o, "max_digits", self.max_digits, self.min_digits, 9, integer=True)
        check_range(o, "heldout_mod", self.heldout_mod, 2, None, integer=True)


def arithmetic_solution(terms: Sequence[int]) -> str:
    """The chain-of-thought answer of ``terms[0] + terms[1] + ...``:
    ``a+b=s1,s1+c=s2,...;total``."""
    steps = []
    total = int(terms[0])
    for t in terms[1:]:
        new = total + int(t)
        steps.append(f"{total}+{int(t)}={new}")
        total = new
    return ",".join(steps) + f";{total}"


def arithmetic_problem(terms: Sequence[int]) -> Problem:
    q = "+".join(str(int(t)) for t in terms) + "="
    return Problem(id=q, question=q, answer=str(int(sum(terms))), task="arith", solution=arithmetic_solution(terms))


def arithmetic_terms(question: str) -> list[int]:
    """The terms of an arithmetic question ``14+0+11+74=`` -> ``[14, 0, 11, 74]``."""
    body = question.strip()
    if not re.fullmatch(r"\d+(\+\d+)+=", body):
        raise ValueError(f"question {question!r} is not an addition chain like '14+0+11=': expected terms "
                         "joined by '+' and a final '='")
    return [int(t) for t in body[:-1].split("+")]


def _step_pieces(text: str) -> list[str]:
    """``text`` cut after every ``,`` and ``;`` (the separators kept): the steps of an answer."""
    return re.findall(r"[^,;]*[,;]|[^,;]+$", text)


def arithmetic_first_error(question: str, response: str) -> int | None:
    """Where an arithmetic response first goes wrong: the index of its first wrong step, or
    None if it is the reference solution.

    Steps are the pieces of the text cut after each ``,`` and ``;`` (the ``step`` segmenter's
    boundaries), separator included: ``14+0=14,`` ``14+11=25,`` ``25+74=99;`` ``99``. Step j
    (0-based) is wrong if it differs from the reference solution's step j
    (:func:`arithmetic_solution`): a wrong partial sum, a wrong operand, a wrong separator, or
    a step that is missing or cut off (a response ending early is wrong at its first missing
    step). Index ``len(terms) - 1`` is the final answer. A prefix made of the first i steps of
    the response is therefore still correct iff ``i <= arithmetic_first_error(...)``
    (or the result is None).

    Raises ValueError if ``question`` is not an addition chain.
    """
    ref = _step_pieces(arithmetic_solution(arithmetic_terms(question)))
    got = _step_pieces(response.strip())
    for j, want in enumerate(ref):
        if j >= len(got) or got[j] != want:
            return j
    return None if len(got) == len(ref) else len(ref)


def question_key(question: str) -> str:
    """The identity of a question: its text with every run of whitespace (spaces, tabs, line
    ends of any style) made one space and the ends trimmed. Two questions with the same key are
    the same question (:func:`load_problems` keeps one; :func:`split_heldout` keeps them on one
    side)."""
    return " ".join(question.split())


def is_heldout(question: str, mod: int) -> bool:
    """The held-out rule: crc32 of the question's key (:func:`question_key`) modulo ``mod`` is 0
    (deterministic; whitespace variants of a question fall on the same side)."""
    return zlib.crc32(question_key(question).encode("utf-8")) % mod == 0


def draw_arithmetic(rng: np.random.Generator, config: ArithmeticConfig) -> Problem:
    n = int(rng.integers(config.min_terms, config.max_terms + 1))
    digits = rng.integers(config.min_digits, config.max_digits + 1, size=n)
    terms = [int(rng.integers(0, 10 ** int(d))) for d in digits]
    return arithmetic_problem(terms)


class ArithmeticStream:
    """An endless, deterministic stream of training problems: ``problem_at(i)`` depends only
    on (seed, i), so a data position (an int) is all a resumed run needs. Held-out questions
    (:func:`is_heldout`) are never produced."""

    def __init__(self, config: ArithmeticConfig | None = None, seed: int = 0) -> None:
        self.config = config or ArithmeticConfig()
        self.seed = int(seed)

    def problem_at(self, i: int) -> Problem:
        rng = np.random.default_rng([self.seed, int(i), 0xA817])
        while True:
            p = draw_arithmetic(rng, self.config)
            if not is_heldout(p.question, self.config.heldout_mod):
                return p


def arithmetic_heldout(n: int, config: ArithmeticConfig | None = None, seed: int = 12345) -> list[Problem]:
    """``n`` distinct held-out arithmetic problems (the evaluation split)."""
    cfg = config or ArithmeticConfig()
    rng = np.random.default_rng([seed, 0xE7A1])
    out: dict[str, Problem] = {}
    tries = 0
    while len(out) < n:
        p = draw_arithmetic(rng, cfg)
        tries += 1
        if is_heldout(p.question, cfg.heldout_mod):
            out.setdefault(p.question, p)
        if tries > 1000 * n + 10_000:
            raise ConfigError(f"could not draw {n} distinct held-out problems with {cfg}")
    return list(out.values())


# ----------------------------------------------------------------------------------------------
# File datasets (GSM8K / MATH formats, or arithmetic question/answer rows)
# ----------------------------------------------------------------------------------------------

def gsm8k_final_answer(answer: str) -> str:
    """The reference number of a GSM8K answer, '' if it has none.

    As GSM8K's own grader (grade-school-math, lm-eval-harness, verl): the number after the last
    ``####``, with commas and ``$`` removed (``#### $1,000`` -> ``1000``). It is read whole by the
    reward's own rule (:func:`llm.rewards.gsm8k_extract`), so ``#### 1/2`` is the fraction
    ``1/2``, ``#### 0`` is ``0``, and ``#### 1.5e3`` (GSM8K never writes scientific notation) is
    no answer rather than ``1.5``.
    """
    number = gsm8k_extract(answer)
    return number if number is not None and gsm8k_value(number) is not None else ""


MAX_DROPPED_FRACTION = 0.1
"""A data file whose rows without a question or reference answer exceed this fraction is an
error (a wrong format or task guess, not a few bad rows); below it they are dropped and reported."""


def _bad_file(option: str, path: Path, why: str) -> ConfigError:
    return ConfigError(f"{option} = {str(path)!r} is invalid: {why}", owner=option, value=str(path), allowed=why)


def _read_rows(path: Path, option: str = "--data") -> list[dict[str, Any]]:
    """The rows of a JSONL/JSON/parquet file (HF ``datasets``); any problem with the file is a
    :class:`ConfigError` naming ``option``, the file and, for JSONL, the line."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".parquet"):
        raise _bad_file(option, path, "expected a .jsonl, .json or .parquet file")
    if path.stat().st_size == 0:
        raise _bad_file(option, path, "the file is empty")
    if suffix == ".jsonl":  # datasets' own errors do not say which line is broken
        n_rows = 0
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise _bad_file(option, path, f"line {number} is not valid JSON ({str(e).splitlines()[0]})") \
                        from None
                if not isinstance(row, dict):
                    raise _bad_file(option, path, f"line {number} is not a JSON object")
                n_rows += 1
        if n_rows == 0:
            raise _bad_file(option, path, "the file has no rows")
    if suffix == ".parquet":  # datasets would log its own multi-line error before raising
        import pyarrow.parquet as pq
        try:
            n_rows = pq.read_metadata(str(path)).num_rows
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a corrupt file
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise _bad_file(option, path, f"cannot be read as parquet ({first})") from None
        if n_rows == 0:
            raise _bad_file(option, path, "the file has no rows")
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset("parquet" if suffix == ".parquet" else "json", data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - pyarrow/datasets raise many types for a corrupt file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise _bad_file(option, path, f"cannot be read as {suffix[1:]} ({first})") from None
    return [dict(r) for r in ds]


def detect_task(rows: Sequence[Mapping[str, Any]]) -> str:
    """The task of a file from *all* its rows: ``problem``+``solution`` -> math;
    ``question``+``answer`` -> gsm8k if any answer holds ``####``, arith if every answer is a
    bare integer; anything else is refused (pass the task explicitly)."""
    cols = set().union(*(r.keys() for r in rows)) if rows else set()
    if {"problem", "solution"} <= cols:
        return "math"
    if {"question", "answer"} <= cols:
        answers = [r.get("answer") for r in rows]
        if any(isinstance(a, str) and "####" in a for a in answers):
            return "gsm8k"
        if all(a is not None and re.fullmatch(r"\s*-?\d+\s*", str(a)) for a in answers):
            return "arith"
        raise ConfigError("--data has question/answer rows but no '####' final answers (GSM8K) and not only "
                          "integer answers (arith): cannot tell the task; pass --task", owner="--data")
    raise ConfigError(f"--data has columns {sorted(cols)}: expected question/answer (GSM8K or arith) "
                      "or problem/solution (MATH)", owner="--data")


_ANSWER_RULES = {
    "gsm8k": "GSM8K: a number after '####', e.g. '#### 1,000' or '#### 1/2'",
    "math": "MATH: an 'answer' column or a \\boxed{} answer in the solution",
    "arith": "arith: an 'answer' column",
}


def _present(value: Any) -> bool:
    """A cell holds a value (``0`` does; None and blank text do not)."""
    return value is not None and str(value).strip() != ""


def load_problems(path: str | os.PathLike, task: str | None = None, option: str = "--data") -> list[Problem]:
    """Problems of a local JSONL/parquet file in GSM8K, MATH or arithmetic format.

    GSM8K rows: ``question``, ``answer`` (reasoning then ``#### N``; :func:`gsm8k_final_answer`).
    MATH rows: ``problem``, ``solution`` (with ``\\boxed{}``; an ``answer`` column, if present,
    wins; :func:`llm.rewards.math_final_answer`). Arithmetic rows: ``question`` (e.g. ``12+5=``),
    ``answer`` (the number), optional ``solution``.
    The task is detected from the whole file (:func:`detect_task`) unless given. Rows without a
    question or reference answer are dropped with a warning that counts them; more than
    :data:`MAX_DROPPED_FRACTION` of the file is an error. A row whose question repeats an earlier
    row's (same :func:`question_key`: whitespace differences do not count) is dropped too, with
    a warning that counts them; the first row of each question is kept.
    """
    p = Path(path)
    if not p.is_file():
        raise _bad_file(option, p, "no such file")
    rows = _read_rows(p, option)
    if task is None:
        task = detect_task(rows)
    check_choice("data", "task", task, TASKS)
    out: list[Problem] = []
    first: dict[str, Problem] = {}  # question key -> the problem kept for it
    repeats = conflicting = 0
    for i, r in enumerate(rows):
        rid = str(r.get("id", r.get("unique_id", i)))
        if task == "gsm8k":
            ans = gsm8k_final_answer(str(r.get("answer", "")))
            q, sol = r.get("question"), r.get("answer")
        elif task == "math":
            given = r.get("answer")
            ans = str(given) if _present(given) else math_final_answer(str(r.get("solution", ""))) or ""
            q, sol = r.get("problem"), r.get("solution")
        else:
            given = r.get("answer")
            ans = str(given) if _present(given) else ""
            q, sol = r.get("question"), r.get("solution")
        if not _present(q) or not ans.strip():
            continue
        problem = Problem(id=rid, question=str(q), answer=ans.strip(), task=task,
                          solution=None if sol is None else str(sol))
        key = question_key(problem.question)
        if key in first:
            repeats += 1
            conflicting += first[key].answer != problem.answer
            continue
        first[key] = problem
        out.append(problem)
    dropped = len(rows) - len(out) - repeats
    if not out or dropped > MAX_DROPPED_FRACTION * len(rows):
        raise _bad_file(option, p, f"{dropped} of {len(rows)} rows have no question or no reference answer for "
                                   f"task {task!r} (more than {MAX_DROPPED_FRACTION:.0%}): wrong format or task? "
                                   f"({_ANSWER_RULES[task]})")
    if dropped:
        warnings.warn(f"{option} = {str(p)!r}: dropped {dropped} of {len(rows)} rows without a question or "
                      f"reference answer ({_ANSWER_RULES[task]})", stacklevel=2)
    if repeats:
        differ = f", {conflicting} of them with a different reference answer" if conflicting else ""
        warnings.warn(f"{option} = {str(p)!r}: dropped {repeats} of {len(rows)} rows that repeat an earlier row's "
                      f"question (whitespace ignored{differ}); the first row of each question is kept", stacklevel=2)
    return out


class FileStream:
    """A deterministic endless stream over a list of problems: epoch e visits them in the
    order of a permutation drawn from (seed, e); ``problem_at(i)`` depends on (seed, i) only."""

    def __init__(self, problems: Sequence[Problem], seed: int = 0) -> None:
        if not problems:
            raise ConfigError("FileStream.problems is empty: expected at least one problem")
        self.problems = list(problems)
        self.seed = int(seed)
        self._perm: dict[int, np.ndarray] = {}

    def problem_at(self, i: int) -> Problem:
        N = len(self.problems)
        epoch, j = divmod(int(i), N)
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, epoch, 0xF11E]).permutation(N)}
        return self.problems[int(self._perm[epoch][j])]


def split_heldout(problems: Sequence[Problem], mod: int = 10) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out), disjoint by question: no held-out question (compared by
    :func:`question_key`, so whitespace variants are the same question) is ever trained on.

    A problem is held out by the crc32 rule of :func:`is_heldout`; if that leaves either side
    empty, the last problem's question alone (every copy of it) is held out. Fewer than two
    distinct questions cannot be split: a :class:`ConfigError` (pass a separate evaluation file).
    """
    keys = [question_key(p.question) for p in problems]
    held_keys = {k for k in keys if is_heldout(k, mod)}
    if not held_keys or held_keys == set(keys):
        held_keys = set(keys[-1:])
    train = [p for p, k in zip(problems, keys) if k not in held_keys]
    held = [p for p, k in zip(problems, keys) if k in held_keys]
    if not train or not held:
        raise ConfigError(f"cannot hold out part of the training problems: they have {len(set(keys))} distinct "
                          "question(s), expected at least 2; pass --eval-data", owner="--data")
    return train, held


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------

def prompt_text(problem: Problem) -> str:
    """The user message of ``problem`` as the reference runs phrased it: arithmetic questions
    as is; GSM8K questions + :data:`GSM8K_INSTRUCTION`; MATH problems + :data:`MATH_INSTRUCTION`."""
    if problem.task == "gsm8k":
        return f"{problem.question} {GSM8K_INSTRUCTION}"
    if problem.task == "math":
        return f"{problem.question} {MATH_INSTRUCTION}"
    return problem.question


def encode_prompt(problem: Problem, tokenizer: Any, use_chat_template: bool | None = None) -> list[int]:
    """Prompt token ids of ``problem``: the chat template with a generation prompt if the
    tokenizer has one (and ``use_chat_template`` is not False), else the plain encoding (with
    the tokenizer's BOS, if it adds one)."""
    text = prompt_text(problem)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template is None:
        use_chat_template = has_template
    if use_chat_template:
        if not has_template:
            raise ConfigError("use_chat_template = True is invalid: the tokenizer has no chat template")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]
    return [int(t) for t in tokenizer(text)["input_ids"]]


@dataclass(frozen=True)
class Prompt:
    """The prompt object the LLM backend hands to the core: the problem and its token ids."""

    problem: Problem
    ids: tuple[int, ...] = field(repr=False)


def make_prompts(problems: Sequence[Problem], tokenizer: Any, use_chat_template: bool | None = None) -> list[Prompt]:
    return [Prompt(p, tuple(encode_prompt(p, tokenizer, use_chat_template))) for p in problems]
