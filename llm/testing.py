"""Small real models for fast tests and smoke runs (seconds on a CPU, no downloads).

:func:`micro_model` builds a very small Llama with the character tokenizer;
:func:`memorize` fits it to a few problems' solutions so that sampling at T = 1 gives a mix of
right and wrong answers (non-zero GRPO advantages), as a pre-trained start would.
:func:`write_arith_heldout` writes an evaluation file disjoint from the sample training file (a
run never trains on a question of its ``--eval-data``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llm.models import TinyModelConfig, build_char_tokenizer, build_tiny_model, save_pretrained_dir
from llm.sft import sft_batch
from llm.tasks import DATA_DIR, Problem, arithmetic_heldout, load_problems, question_key

MICRO = TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        max_position_embeddings=96)
"""A ~10 k-parameter model shape for unit tests."""


def micro_model(seed: int = 0, config: TinyModelConfig = MICRO) -> tuple[Any, Any]:
    """``(model, tokenizer)``: a freshly initialised micro Llama and the character tokenizer."""
    tok = build_char_tokenizer()
    return build_tiny_model(tok, config, seed=seed), tok


def memorize(model: Any, tokenizer: Any, problems: Sequence[Problem], steps: int = 60, lr: float = 1e-2,
             seed: int = 0) -> list[float]:
    """Fit ``model`` to prompt -> solution of ``problems`` (full batch, AdamW). Returns the losses."""
    torch.manual_seed(seed)
    input_ids, attn, labels = sft_batch(list(problems), tokenizer)
    position = (attn.cumsum(-1) - 1).clamp(min=0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        logits = model(input_ids=input_ids, attention_mask=attn, position_ids=position).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def save_micro_model(path: str | Path, problems: Sequence[Problem] = (), steps: int = 60, seed: int = 0,
                     config: TinyModelConfig = MICRO) -> Path:
    """Build a micro model (shape ``config``), optionally :func:`memorize` ``problems``, and save
    it to ``path``."""
    model, tok = micro_model(seed, config)
    if problems:
        memorize(model, tok, problems, steps=steps, seed=seed)
    return save_pretrained_dir(model, tok, path)


def write_arith_heldout(path: str | Path, n: int = 8, exclude: str | Path = DATA_DIR / "arith_sample.jsonl") -> Path:
    """Write ``n`` arithmetic problems (JSONL: ``question``, ``answer``, ``solution``) whose
    questions are not in ``exclude`` (default: the sample file the tests train on), for use as
    ``--eval-data`` beside ``--data exclude``. Returns ``path``."""
    taken = {question_key(p.question) for p in load_problems(exclude)}
    problems = [p for p in arithmetic_heldout(n + len(taken)) if question_key(p.question) not in taken][:n]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"question": p.question, "answer": p.answer, "solution": p.solution}) + "\n"
                            for p in problems))
    return path
