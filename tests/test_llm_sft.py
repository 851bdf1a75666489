"""The tiny-arith preset: SFT from scratch reaches a useful partial accuracy and saves a normal
transformers checkpoint; the SFT schedule and batches are right."""

from __future__ import annotations

import json

import pytest
import torch

from llm.models import build_char_tokenizer
from llm.sft import SFTConfig, lr_factor, sft_batch
from llm.tasks import arithmetic_problem

MIN_SAMPLED = 0.20
"""Stated minimum held-out sampled mean@1 after the default SFT (measured: 0.355 sampled, 0.623 greedy)."""
MIN_GREEDY = 0.30


def test_sft_batch_masks_the_prompt():
    tok = build_char_tokenizer()
    probs = [arithmetic_problem([1, 2]), arithmetic_problem([10, 20, 30])]
    ids, attn, labels = sft_batch(probs, tok)
    assert ids.shape == attn.shape == labels.shape
    for b, p in enumerate(probs):
        n_prompt = len(p.question) + 1  # BOS + characters
        n = int(attn[b].sum())
        assert (labels[b, :n_prompt] == -100).all() and (labels[b, n:] == -100).all()
        assert tok.decode(labels[b, n_prompt:n].tolist()) == p.solution + "<eos>"
        assert torch.equal(labels[b, n_prompt:n], ids[b, n_prompt:n])


def test_sft_batch_tensors_by_hand():
    """``1+2=`` -> ``1+2=3;3``, padded after ``2+30=`` -> ``2+30=32;32`` (one token per character)."""
    from llm.models import char_vocab
    from llm.tasks import DATA_DIR, encode_prompt, load_problems
    v = char_vocab()
    tok = build_char_tokenizer()
    ids, attn, labels = sft_batch([arithmetic_problem([1, 2]), arithmetic_problem([2, 30])], tok)

    def chars(text):
        return [v[c] for c in text]
    first = [v["<bos>"], *chars("1+2="), *chars("1+2=3;3"), v["<eos>"]]
    second = [v["<bos>"], *chars("2+30="), *chars("2+30=32;32"), v["<eos>"]]
    assert ids.tolist() == [first + [v["<pad>"]] * 4, second]
    assert attn.tolist() == [[1] * 13 + [0] * 4, [1] * 17]
    assert labels.tolist() == [[-100] * 5 + first[5:] + [-100] * 4, [-100] * 6 + second[6:]]
    assert ids.dtype == attn.dtype == labels.dtype == torch.int64
    # prompts are encoded as encode_prompt encodes them without a chat template (GSM8K: with its instruction)
    gsm = load_problems(DATA_DIR / "gsm8k_sample.jsonl")[:1]
    ids, attn, labels = sft_batch(gsm, tok)
    n = len(encode_prompt(gsm[0], tok, use_chat_template=False))
    assert ids[0, :n].tolist() == encode_prompt(gsm[0], tok, use_chat_template=False)
    assert (labels[0, :n] == -100).all() and labels[0, n] == ids[0, n] != -100


def test_lr_schedule():
    assert lr_factor(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(99, 100, 10, 0.1) == pytest.approx(0.1, abs=1e-3)
    assert all(lr_factor(s, 100, 10, 0.1) >= lr_factor(s + 1, 100, 10, 0.1) for s in range(10, 99))


@pytest.mark.slow
def test_sft_preset_reaches_stated_accuracy(tmp_path, capsys):
    """`deepgrpo llm sft --preset tiny-arith` (default 600 steps; 4.7 min on 2 idle cores)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deepgrpo.cli import main
    before = torch.get_num_threads()
    out = tmp_path / "sft"
    try:
        assert main(["llm", "sft", "--preset", "tiny-arith", "--out", str(out), "--threads", "2"]) == 0
    finally:
        torch.set_num_threads(before)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    res = json.loads((out / "eval.json").read_text())
    assert printed["sampled_mean@1"] == res["sampled_mean@1"]
    assert res["n_problems"] == SFTConfig().eval.n_problems == 512
    assert res["sampled_mean@1"] >= MIN_SAMPLED, res
    assert res["greedy_mean@1"] >= MIN_GREEDY, res
    assert res["pass@4"] >= res["sampled_mean@1"]
    # a normal transformers checkpoint
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    ids = tok("12+30=", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))
    assert json.loads((out / "sft_config.json").read_text())["config"]["steps"] == 600
