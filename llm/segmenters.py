"""Segmenters: cut a response into steps whose starts are the candidate pivots (paper §3.2).

A segmenter maps the response token ids ``[S]`` to ``LongTensor [L]`` of exclusive segment
ends **in token space** (strictly increasing, the last equal to S; empty for S = 0). Pivots are
therefore token positions and a branch continues from the exact prefix ids.

* :class:`FixedTokenSegmenter`: every ``size`` tokens.
* :class:`TextBoundarySegmenter`: after each token that contains a boundary character of a
  regular expression over the response text; presets ``sentence`` (``. ! ?`` followed by
  whitespace, with any line breaks right after them, and runs of line breaks), ``line`` (runs
  of line breaks) and ``step`` (the arithmetic task's
  ``,`` step separator and ``;`` before the final answer).

Text boundaries are found on the concatenation of the tokens' individual texts (cached per
token id), so the token index of each boundary is exact even for byte-level BPE tokenizers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from deepgrpo.config import ConfigError, check_choice, check_range

SEGMENTERS = ("sentence", "line", "step", "fixed")
PATTERNS = {
    "sentence": r"[.!?][\"')\]]*(?:\n+|(?=\s))|\n+",
    "line": r"\n+",
    "step": r"[,;]",
}
TASK_DEFAULT_SEGMENTER = {"arith": "step", "gsm8k": "line", "math": "sentence"}
"""The segmenter each task uses unless told otherwise."""


class Segmenter(Protocol):
    def __call__(self, token_ids: Sequence[int]) -> torch.Tensor:
        """``LongTensor [L]`` exclusive segment ends of a response of ``len(token_ids)`` tokens."""
        ...


def _finish(ends: list[int], length: int, min_tokens: int) -> torch.Tensor:
    """Sorted, de-duplicated ends in (0, length], merged so that every segment but the last
    has >= ``min_tokens`` tokens, with ``length`` as the last end."""
    out: list[int] = []
    prev = 0
    for e in sorted(set(ends)):
        if e <= prev or e >= length:
            continue
        if e - prev >= min_tokens:
            out.append(e)
            prev = e
    if length > 0:
        out.append(length)
    return torch.tensor(out, dtype=torch.long)


class FixedTokenSegmenter:
    """Segments of ``size`` tokens (the last one may be shorter)."""

    def __init__(self, size: int = 16) -> None:
        check_range("FixedTokenSegmenter", "size", size, 1, None, integer=True)
        self.size = int(size)

    def __call__(self, token_ids: Sequence[int]) -> torch.Tensor:
        S = len(token_ids)
        return _finish(list(range(self.size, S, self.size)), S, 1)


class TextBoundarySegmenter:
    """A segment ends after each token holding the last character of a ``pattern`` match.

    Args:
        tokenizer: decodes single token ids (``tokenizer.decode([id])``); special tokens such
            as EOS decode to ''.
        pattern: regular expression over the response text.
        min_tokens: segments shorter than this are merged into the next one.
    """

    def __init__(self, tokenizer: Any, pattern: str, min_tokens: int = 1) -> None:
        check_range("TextBoundarySegmenter", "min_tokens", min_tokens, 1, None, integer=True)
        try:
            self.regex = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"TextBoundarySegmenter.pattern = {pattern!r} is invalid: {e}") from e
        self.tokenizer = tokenizer
        self.min_tokens = int(min_tokens)
        self._text: dict[int, str] = {}

    def token_text(self, token_id: int) -> str:
        t = self._text.get(token_id)
        if t is None:
            t = self.tokenizer.decode([int(token_id)], skip_special_tokens=True)
            self._text[token_id] = t
        return t

    def __call__(self, token_ids: Sequence[int]) -> torch.Tensor:
        ids = [int(t) for t in token_ids]
        S = len(ids)
        pieces = [self.token_text(t) for t in ids]
        owner: list[int] = []  # char -> token index
        for k, piece in enumerate(pieces):
            owner.extend([k] * len(piece))
        text = "".join(pieces)
        ends = [owner[m.end() - 1] + 1 for m in self.regex.finditer(text) if m.end() > m.start()]
        return _finish(ends, S, self.min_tokens)


def make_segmenter(kind: str, tokenizer: Any, size: int = 16, min_tokens: int = 1) -> Segmenter:
    """The segmenter named ``kind`` (one of :data:`SEGMENTERS`)."""
    check_choice("segmenter", "kind", kind, SEGMENTERS)
    if kind == "fixed":
        return FixedTokenSegmenter(size)
    return TextBoundarySegmenter(tokenizer, PATTERNS[kind], min_tokens)
