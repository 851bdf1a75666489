"""Tasks and data: the synthetic arithmetic task, GSM8K- and MATH-format loaders, prompt templates,
and deterministic problem streams (position -> problem) for resumable training.

Task names: ``arith`` (built in, chain-of-thought addition chains), ``gsm8k`` (``question``,
``answer`` ending in ``#### N``), ``math`` (``problem``, ``solution`` with ``\\boxed{}``).
Files are local JSONL or parquet, read through HF ``datasets``.
"""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from deepgrpo.config import ConfigError, check_choice, check_range

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

    min_terms, max_terms: number of terms, drawn uniformly (difficulty knob).
    min_digits, max_digits: digits per operand, drawn uniformly per operand (difficulty knob).
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


def is_heldout(question: str, mod: int) -> bool:
    """The held-out rule: crc32 of the question text modulo ``mod`` is 0 (deterministic, disjoint)."""
    return zlib.crc32(question.encode("utf-8")) % mod == 0


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
    """The number after the last ``####`` of a GSM8K answer, commas removed ('' if none)."""
    m = re.findall(r"####\s*(-?[0-9.,]+)", answer)
    if not m:
        return ""
    return m[-1].replace(",", "").rstrip(".")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text`` with balanced
    braces, or None. Never raises."""
    if not isinstance(text, str):
        return None
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    j = i
    while j < len(text):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
        j += 1
    return None


def _read_rows(path: Path) -> list[dict[str, Any]]:
    import datasets

    datasets.disable_progress_bars()
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        kind = "json"
    elif suffix == ".parquet":
        kind = "parquet"
    else:
        raise ConfigError(f"--data = {str(path)!r} is invalid: expected a .jsonl, .json or .parquet file")
    ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    return [dict(r) for r in ds]


def detect_task(columns: Sequence[str], first_answer: Any = None) -> str:
    """Task of a file from its columns: ``problem``+``solution`` -> math; ``question``+``answer``
    -> gsm8k if the answer holds ``####``, else arith."""
    cols = set(columns)
    if {"problem", "solution"} <= cols:
        return "math"
    if {"question", "answer"} <= cols:
        return "gsm8k" if isinstance(first_answer, str) and "####" in first_answer else "arith"
    raise ConfigError(f"--data has columns {sorted(cols)}: expected question/answer (GSM8K or arith) "
                      "or problem/solution (MATH)")


def load_problems(path: str | os.PathLike, task: str | None = None) -> list[Problem]:
    """Problems of a local JSONL/parquet file in GSM8K, MATH or arithmetic format.

    GSM8K rows: ``question``, ``answer`` (reasoning then ``#### N``). MATH rows: ``problem``,
    ``solution`` (with ``\\boxed{}``; an ``answer`` column, if present, wins). Arithmetic rows:
    ``question`` (e.g. ``12+5=``), ``answer`` (the number), optional ``solution``.
    Rows without a reference answer are skipped.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--data = {str(path)!r} is invalid: no such file")
    rows = _read_rows(p)
    if not rows:
        raise ConfigError(f"--data = {str(path)!r} is invalid: the file has no rows")
    if task is None:
        task = detect_task(list(rows[0]), rows[0].get("answer"))
    check_choice("data", "task", task, TASKS)
    out = []
    for i, r in enumerate(rows):
        rid = str(r.get("id", r.get("unique_id", i)))
        if task == "gsm8k":
            ans = gsm8k_final_answer(str(r.get("answer", "")))
            q, sol = r.get("question"), r.get("answer")
        elif task == "math":
            ans = r.get("answer") or last_boxed(str(r.get("solution", ""))) or ""
            q, sol = r.get("problem"), r.get("solution")
        else:
            ans = str(r.get("answer", "")).strip()
            q, sol = r.get("question"), r.get("solution")
        if not q or not str(ans).strip():
            continue
        out.append(Problem(id=rid, question=str(q), answer=str(ans).strip(), task=task,
                           solution=None if sol is None else str(sol)))
    if not out:
        raise ConfigError(f"--data = {str(path)!r} is invalid: no row has a question and a reference answer")
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
    """(train, held-out) by the crc32 rule of :func:`is_heldout` on the question; if that leaves
    either side empty, the last problem alone is held out."""
    train = [p for p in problems if not is_heldout(p.question, mod)]
    held = [p for p in problems if is_heldout(p.question, mod)]
    if not train or not held:
        return list(problems[:-1]) or list(problems), list(problems[-1:])
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
