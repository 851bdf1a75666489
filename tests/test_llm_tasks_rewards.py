"""Tasks, data loaders, prompt templates, rewards and segmenters of the LLM backend."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepgrpo.config import ConfigError
from llm.models import build_char_tokenizer
from llm.rewards import arithmetic_reward, gsm8k_reward, math_reward, score
from llm.segmenters import FixedTokenSegmenter, TextBoundarySegmenter, make_segmenter
from llm.tasks import (
    DATA_DIR,
    GSM8K_INSTRUCTION,
    MATH_INSTRUCTION,
    ArithmeticConfig,
    ArithmeticStream,
    FileStream,
    arithmetic_heldout,
    arithmetic_problem,
    encode_prompt,
    gsm8k_final_answer,
    is_heldout,
    last_boxed,
    load_problems,
    prompt_text,
)


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


# -- arithmetic task ----------------------------------------------------------------------------

def test_arithmetic_solution_is_a_correct_chain():
    p = arithmetic_problem([14, 0, 11, 74])
    assert p.question == "14+0+11+74="
    assert p.solution == "14+0=14,14+11=25,25+74=99;99"
    assert p.answer == "99"
    rng = np.random.default_rng(0)
    for _ in range(200):
        terms = rng.integers(0, 1000, size=rng.integers(2, 7)).tolist()
        p = arithmetic_problem(terms)
        steps, final = p.solution.split(";")
        assert int(final) == sum(terms)
        for s in steps.split(","):  # every step is a true equation
            lhs, rhs = s.split("=")
            a, b = lhs.split("+")
            assert int(a) + int(b) == int(rhs)
        assert arithmetic_reward(p.solution, p.answer) == 1.0


def test_arithmetic_difficulty_knobs_and_heldout_split():
    cfg = ArithmeticConfig(min_terms=4, max_terms=4, min_digits=3, max_digits=3)
    stream = ArithmeticStream(cfg, seed=3)
    probs = [stream.problem_at(i) for i in range(300)]
    for p in probs:
        terms = p.question[:-1].split("+")
        assert len(terms) == 4 and all(0 <= int(t) < 1000 for t in terms)
        assert not is_heldout(p.question, cfg.heldout_mod)
    # deterministic by position, different positions differ
    assert stream.problem_at(17) == ArithmeticStream(cfg, seed=3).problem_at(17)
    assert len({p.question for p in probs}) > 290
    held = arithmetic_heldout(200, cfg)
    assert len({p.question for p in held}) == 200
    assert all(is_heldout(p.question, cfg.heldout_mod) for p in held)
    assert not {p.question for p in held} & {p.question for p in probs}


def test_arithmetic_config_validation():
    with pytest.raises(ConfigError, match="max_terms"):
        ArithmeticConfig(min_terms=5, max_terms=3)
    with pytest.raises(ConfigError, match="min_digits"):
        ArithmeticConfig(min_digits=0)


# -- files --------------------------------------------------------------------------------------

def test_gsm8k_loader_and_final_answer_rule():
    probs = load_problems(DATA_DIR / "gsm8k_sample.jsonl")
    assert len(probs) == 10 and {p.task for p in probs} == {"gsm8k"}
    assert [p.answer for p in probs][:5] == ["12", "110", "13", "3000", "52.5"]
    assert gsm8k_final_answer("a\n#### 1,234") == "1234"
    assert gsm8k_final_answer("no marker 5") == ""
    for p in probs:  # the reference solution scores 1 under the reward rule
        assert gsm8k_reward(p.solution, p.answer) == 1.0


def test_math_loader_and_boxed_extraction():
    probs = load_problems(DATA_DIR / "math_sample.jsonl")
    assert len(probs) == 8 and {p.task for p in probs} == {"math"}
    assert probs[0].answer == "\\frac{5}{6}"
    assert last_boxed("x \\boxed{1} then \\boxed{\\frac{a}{b}} end") == "\\frac{a}{b}"
    assert last_boxed("\\boxed{unclosed {") is None
    assert last_boxed(None) is None


def test_parquet_and_task_override(tmp_path):
    import pandas as pd

    rows = [json.loads(line) for line in (DATA_DIR / "gsm8k_sample.jsonl").read_text().splitlines()]
    pd.DataFrame(rows).to_parquet(tmp_path / "g.parquet")
    probs = load_problems(tmp_path / "g.parquet")
    assert [p.answer for p in probs] == [p.answer for p in load_problems(DATA_DIR / "gsm8k_sample.jsonl")]
    arith = load_problems(DATA_DIR / "arith_sample.jsonl")
    assert {p.task for p in arith} == {"arith"} and arith[2].answer == "99"
    with pytest.raises(ConfigError, match="--data"):
        load_problems(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(ConfigError, match="columns"):
        load_problems(tmp_path / "bad.jsonl")


def test_file_stream_visits_each_problem_once_per_epoch():
    probs = load_problems(DATA_DIR / "math_sample.jsonl")
    s = FileStream(probs, seed=1)
    epoch0 = [s.problem_at(i).id for i in range(8)]
    epoch1 = [s.problem_at(i).id for i in range(8, 16)]
    assert sorted(epoch0) == sorted(p.id for p in probs) == sorted(epoch1)
    assert epoch0 != epoch1 or epoch0 != [p.id for p in probs]
    assert [FileStream(probs, seed=1).problem_at(i).id for i in range(8, 16)] == epoch1


def test_prompt_templates(tok):
    g = load_problems(DATA_DIR / "gsm8k_sample.jsonl")[0]
    m = load_problems(DATA_DIR / "math_sample.jsonl")[0]
    assert prompt_text(g).endswith(GSM8K_INSTRUCTION) and "####" in prompt_text(g)
    assert prompt_text(m).endswith(MATH_INSTRUCTION) and "\\boxed{}" in prompt_text(m)
    a = arithmetic_problem([1, 2, 3])
    ids = encode_prompt(a, tok)
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == "1+2+3="
    tok2 = build_char_tokenizer()
    tok2.chat_template = ("{% for m in messages %}({{ m['content'] }}){% endfor %}"
                          "{% if add_generation_prompt %}=={% endif %}")
    ids = encode_prompt(a, tok2)
    assert tok2.decode(ids, skip_special_tokens=True) == "(1+2+3=)=="
    assert encode_prompt(a, tok2, use_chat_template=False) == encode_prompt(a, tok)


# -- rewards ------------------------------------------------------------------------------------

def test_arithmetic_reward_hand_written():
    assert arithmetic_reward("14+0=14,14+11=25,25+74=99;99", "99") == 1.0
    assert arithmetic_reward("14+0=14,14+11=25,25+74=98;98", "99") == 0.0  # wrong
    assert arithmetic_reward("14+0=14,14+11=25,25+74=99", "99") == 0.0  # no final answer
    assert arithmetic_reward("wrong steps;99", "99") == 1.0  # outcome reward: final answer only
    assert arithmetic_reward(";99;", "99") == 0.0
    assert arithmetic_reward(";099", "99") == 0.0  # exact match
    assert arithmetic_reward("", "99") == 0.0
    assert score("arith", "1+2=3;3", "3", truncated=True) == 0.0
    assert score("arith", "1+2=3;3", "3", truncated=False) == 1.0


def test_gsm8k_reward_hand_written():
    assert gsm8k_reward("She has 42 - 30 = 12 left.\n#### 12", "12") == 1.0
    assert gsm8k_reward("#### 3,000", "3000") == 1.0
    assert gsm8k_reward("#### 52.50", "52.5") == 1.0
    assert gsm8k_reward("#### 12.", "12") == 1.0
    assert gsm8k_reward("#### 11 ... wait #### 12", "12") == 1.0  # the last marker counts
    assert gsm8k_reward("#### 13", "12") == 0.0
    assert gsm8k_reward("the answer is 12", "12") == 0.0  # strict rule needs ####
    assert gsm8k_reward("the answer is 12", "12", mode="flexible") == 1.0
    assert gsm8k_reward("#### -7", "-7") == 1.0 and gsm8k_reward("#### 7", "-7") == 0.0
    assert score("gsm8k", "#### 12", "12", truncated=True) == 0.0
    with pytest.raises(ValueError, match="mode"):
        gsm8k_reward("#### 1", "1", mode="lenient")


def test_math_reward_hand_written():
    assert math_reward("so the answer is $\\boxed{\\frac{5}{6}}$", "\\frac{5}{6}") == 1.0
    assert math_reward("$\\boxed{0.5}$", "\\frac{1}{2}") == 1.0  # equivalence, not string match
    assert math_reward("$\\boxed{(x+1)^2}$", "x^2+2x+1") == 1.0
    assert math_reward("$\\boxed{5\\sqrt{2}}$", "5\\sqrt{2}") == 1.0
    assert math_reward("$\\boxed{7}$", "6") == 0.0
    assert math_reward("", "6") == 0.0
    assert score("math", "$\\boxed{6}$", "6", truncated=True) == 0.0


@pytest.mark.parametrize("text", [
    None, 12, "", " ", "\\boxed{", "\\boxed{{{{{{{{", "}}}}\\boxed{}}}", "#### ", "####", ";", ";;;;",
    "\x00\x01\x02", "💥" * 50, "#" * 10_000, "9" * 5000, "\\frac{1}{0}", "\\boxed{1/0}", "$$$$", "\\\\\\",
    "#### 1e999", "#### 99999999999999999999999999999999999", "\\boxed{\\sqrt{-1}^{\\infty}}",
])
def test_rewards_never_raise_on_malformed_text(text):
    for task, answer in (("arith", "3"), ("gsm8k", "3"), ("math", "3")):
        r = score(task, text, answer)
        assert r in (0.0, 1.0)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=300))
def test_rewards_never_raise_fuzz(text):
    assert arithmetic_reward(text, "5") in (0.0, 1.0)
    assert gsm8k_reward(text, "5") in (0.0, 1.0)
    assert gsm8k_reward(text, "5", mode="flexible") in (0.0, 1.0)


@settings(max_examples=15, deadline=None)
@given(st.text(alphabet="\\{}boxed0123456789+-*/^()$.,frac ", max_size=80))
def test_math_reward_never_raises_fuzz(text):
    assert math_reward(text, "5") in (0.0, 1.0)


# -- segmenters ---------------------------------------------------------------------------------

def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_step_segmenter_cuts_after_arithmetic_steps(tok):
    text = "14+0=14,14+11=25,25+74=99;99"
    ids = _ids(tok, text) + [tok.eos_token_id]
    ends = make_segmenter("step", tok)(ids).tolist()
    assert ends[-1] == len(ids)
    assert ends == [text.index(",") + 1, text.rindex(",") + 1, text.index(";") + 1, len(ids)]
    for e in ends[:-1]:
        assert tok.decode(ids[:e])[-1] in ",;"


def test_sentence_line_fixed_segmenters(tok):
    text = "1+2=3. 4*4!\n\n5.5 (6)\n7"
    ids = _ids(tok, text)
    sent = make_segmenter("sentence", tok)(ids).tolist()
    line = make_segmenter("line", tok)(ids).tolist()
    assert [tok.decode(ids[:e]) for e in sent] == ["1+2=3.", "1+2=3. 4*4!\n\n", "1+2=3. 4*4!\n\n5.5 (6)\n", text]
    assert [tok.decode(ids[:e]) for e in line] == ["1+2=3. 4*4!\n\n", "1+2=3. 4*4!\n\n5.5 (6)\n", text]
    assert FixedTokenSegmenter(8)(ids).tolist() == list(range(8, len(ids), 8)) + [len(ids)]
    assert FixedTokenSegmenter(8)([]).numel() == 0 and make_segmenter("line", tok)([]).numel() == 0
    assert make_segmenter("line", tok)(_ids(tok, "1+2 3")).tolist() == [5]


def test_text_segmenter_on_a_multi_character_bpe_tokenizer():
    """Boundaries inside multi-character tokens map to the exact token index."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["The cat sat. The dog ran!\nA bird flew.", "Numbers like 3.5 are not ends. Right?\nYes."] * 20
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", unk_token="<unk>")
    text = "The cat sat. Numbers like 3.5 are not ends. Right?\nYes."
    ids = bpe(text, add_special_tokens=False)["input_ids"] + [bpe.eos_token_id]
    assert len(ids) < len(text)  # really multi-character tokens
    ends = TextBoundarySegmenter(bpe, r"[.!?](?:\n+|(?=\s))|\n+")(ids).tolist()
    prefixes = [bpe.decode(ids[:e], skip_special_tokens=True) for e in ends]
    assert ends[-1] == len(ids)
    assert [p.rstrip("\n")[-1] for p in prefixes[:-1]] == [".", ".", "?"]
    assert all(re.search(r"3\.5$", p) is None for p in prefixes)  # decimals are not sentence ends
    assert torch.all(torch.diff(torch.tensor(ends)) > 0)


def test_segmenter_validation(tok):
    with pytest.raises(ConfigError, match="kind"):
        make_segmenter("paragraph", tok)
    with pytest.raises(ConfigError, match="size"):
        FixedTokenSegmenter(0)
    with pytest.raises(ConfigError, match="pattern"):
        TextBoundarySegmenter(tok, "[unclosed")


def test_math_reward_works_from_a_worker_thread_with_a_timeout_that_holds():
    """math-verify's timeout uses signals (main thread only); from a thread, as TRL and verl call
    rewards, the score must still be right and a pathological answer must still be cut off."""
    import threading
    import time

    from llm.rewards import math_reward
    out = {}

    def work():
        out["right"] = math_reward("so the answer is \\boxed{\\frac{1}{2}}", "0.5")
        out["wrong"] = math_reward("\\boxed{3}", "0.5")
        t = time.perf_counter()
        out["slow"] = math_reward("\\boxed{9^{9^{9^{9}}}}", "1", timeout_s=1)  # sympy would take ages
        out["slow_s"] = time.perf_counter() - t
        out["after"] = math_reward("\\boxed{42}", "42")  # a fresh child after the kill

    th = threading.Thread(target=work)
    th.start()
    th.join(120)
    assert not th.is_alive()
    assert (out["right"], out["wrong"], out["slow"], out["after"]) == (1.0, 0.0, 0.0, 1.0)
    assert out["slow_s"] < 8.0


def test_task_detection_reads_the_whole_file_and_dropped_rows_are_counted(tmp_path):
    """A GSM8K file whose *first* answer lacks '####' used to be taken for the arithmetic task
    (every reward 0, exit 0); rows without '####' were dropped without a word."""
    import json
    import warnings

    from deepgrpo.config import ConfigError
    rows = [{"question": "q0", "answer": "some reasoning without a final line"}]
    rows += [{"question": f"q{i}", "answer": f"reasoning\n#### {i}"} for i in range(1, 12)]
    f = tmp_path / "gsm.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        problems = load_problems(f)
    assert {p.task for p in problems} == {"gsm8k"} and len(problems) == 11
    assert any("dropped 1 of 12 rows" in str(w.message) for w in caught)
    f.write_text("\n".join(json.dumps(r) for r in rows[:1] + rows[1:3]))  # 1 of 3 dropped: above the limit
    with pytest.raises(ConfigError, match="1 of 3 rows have no question or no reference answer"):
        load_problems(f)
    f.write_text(json.dumps({"question": "q", "answer": "free text"}))  # neither GSM8K nor arith
    with pytest.raises(ConfigError, match="cannot tell the task; pass --task"):
        load_problems(f)


# -- GSM8K answers: one rule for references and responses, exact comparison ---------------------

@pytest.mark.parametrize("solution,reference", [
    ("half of it\n#### 1/2", "1/2"),  # a fraction is read whole (it used to become 1)
    ("#### 1.5e3", ""),  # GSM8K never writes scientific notation: no answer (it used to become 1.5)
    ("#### 1,000", "1000"),
    ("#### $5", "5"),  # it used to be no answer
    ("#### 0", "0"),
    ("#### -7", "-7"),
    ("#### -$1,234.5.", "-1234.5"),
    ("#### 2.25", "2.25"),
    ("#### 12 eggs", "12"),
    ("#### 11\nno wait\n#### 13", "13"),
    ("#### 1/0", ""),
    ("#### 1/2/3", ""),
    ("no marker 5", ""),
])
def test_gsm8k_reference_answer_is_the_number_after_the_last_marker(solution, reference):
    assert gsm8k_final_answer(solution) == reference


@pytest.mark.parametrize("response,reference,expected", [
    ("#### 1/2", "1/2", 1.0), ("#### 0.5", "1/2", 1.0), ("#### 2/4", "0.5", 1.0), ("#### 1", "1/2", 0.0),
    ("#### 1.5e3", "1.5", 0.0), ("#### 1.5e3", "1500", 0.0),  # never truncated to 1.5
    ("#### 1,000", "1000", 1.0), ("#### 1000", "1,000", 1.0),
    ("#### $5", "5", 1.0), ("#### 5", "$5", 1.0), ("#### 5.0", "5", 1.0), ("#### 5.", "5", 1.0),
    ("#### 0", "0", 1.0), ("#### 0.0", "0", 1.0), ("#### 00", "0", 1.0), ("#### 1", "0", 0.0), ("#### 0", "1", 0.0),
    ("#### -3", "-3", 1.0), ("#### -$3", "-3", 1.0), ("#### $-3", "-3", 1.0), ("#### 3", "-3", 0.0),
    ("#### 0.10", "0.1", 1.0), ("#### 0.1000000000000000001", "0.1", 0.0),  # exact, not floats
    ("#### 12345678901234567891", "12345678901234567890", 0.0),
    ("#### 12", "1.5e3", 0.0), ("#### 1", "", 0.0), ("#### 1", "one", 0.0),
])
def test_gsm8k_reward_compares_exact_values(response, reference, expected):
    assert gsm8k_reward(response, reference) == expected


def test_gsm8k_flexible_mode_reads_numbers_whole():
    assert gsm8k_reward("so she has 1/2 of it", "0.5", mode="flexible") == 1.0
    assert gsm8k_reward("it is 1.5e3", "3", mode="flexible") == 0.0  # the last number is 1.5e3, not 3
    assert gsm8k_reward("it is 1.5e3", "1.5", mode="flexible") == 0.0
    assert gsm8k_reward("costs $1,000.", "1000", mode="flexible") == 1.0
    assert gsm8k_reward("nothing left: 0", "0", mode="flexible") == 1.0


def _write_rows(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_gsm8k_loader_reads_every_answer_form_and_the_reference_solution_scores_1(tmp_path):
    import warnings

    finals = ["1/2", "1.5e3", "1,000", "$5", "0", "-7", "2.25", "-$1,234.5", "12", "3,000", "40"]
    rows = [{"question": f"question {i}", "answer": f"work\n#### {a}"} for i, a in enumerate(finals)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probs = load_problems(_write_rows(tmp_path / "g.jsonl", rows))
    assert [p.answer for p in probs] == ["1/2", "1000", "5", "0", "-7", "2.25", "-1234.5", "12", "3000", "40"]
    assert [str(w.message).split(": ", 1)[1] for w in caught] == [
        "dropped 1 of 11 rows without a question or reference answer "
        "(GSM8K: a number after '####', e.g. '#### 1,000' or '#### 1/2')"]
    for p in probs:
        assert gsm8k_reward(p.solution, p.answer) == 1.0
    assert gsm8k_reward("#### 1", probs[0].answer) == 0.0 and gsm8k_reward("#### 0.5", probs[0].answer) == 1.0


def test_a_zero_answer_cell_is_an_answer(tmp_path):
    arith = load_problems(_write_rows(tmp_path / "a.jsonl", [{"question": "0+0=", "answer": 0},
                                                             {"question": "1+2=", "answer": 3}]))
    assert [(p.question, p.answer) for p in arith] == [("0+0=", "0"), ("1+2=", "3")]
    math = load_problems(_write_rows(tmp_path / "m.jsonl", [
        {"problem": "What is 1-1?", "solution": "It is $\\boxed{1-1}$.", "answer": 0},
        {"problem": "What is 2-1?", "solution": "It is $\\boxed{1}$.", "answer": None}]))
    assert [p.answer for p in math] == ["0", "1"]  # the answer column wins, also when it is 0


# -- MATH answers: the last top-level box ---------------------------------------------------------

LAST_BOX_CASES = [
    ("$\\boxed{\\frac{1}{\\boxed{2}}}$", "\\frac{1}{\\boxed{2}}", "\\frac{1}{2}"),  # not the inner box
    ("\\boxed{1} wait \\boxed{\\sqrt{\\boxed{4}}} done", "\\sqrt{\\boxed{4}}", "\\sqrt{4}"),
    ("so it is $\\boxed 5$.", "5", "5"),
    ("so it is \\boxed 5\nnext line", "5", "5"),
    ("\\fbox{7}", "7", "7"),
    ("\\boxed {4}", "4", "4"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}", "\\{1,2\\}"),  # escaped braces are not structure
    ("\\boxed{\\left\\{ x \\right.}", "\\left\\{ x \\right.", "\\left\\{ x \\right."),
    ("\\boxed{3} then \\boxed{cut off {", None, None),  # the last box never closes
    ("\\boxedx{3}", None, None),
    ("no box", None, None),
]
"""(text, content of its last top-level box, that content with nested boxes unwrapped)."""


@pytest.mark.parametrize("text,content,answer", LAST_BOX_CASES)
def test_last_top_level_box(text, content, answer):
    assert last_boxed(text) == content


@pytest.mark.parametrize("text,content,answer", LAST_BOX_CASES)
def test_math_final_answer_unwraps_boxes_inside_the_last_box(text, content, answer):
    from llm.rewards import math_final_answer
    assert math_final_answer(text) == answer


@pytest.mark.parametrize("response,reference,expected", [
    ("$\\boxed{\\frac{1}{\\boxed{2}}}$", "\\frac{1}{2}", 1.0),
    ("$\\boxed{\\frac{1}{\\boxed{2}}}$", "2", 0.0),  # the inner box is not the answer
    ("\\boxed{1} wait \\boxed{\\sqrt{\\boxed{4}}}", "2", 1.0),
    ("\\boxed{1} wait \\boxed{\\sqrt{\\boxed{4}}}", "1", 0.0),
    ("so it is $\\boxed 5$.", "5", 1.0),
    ("\\fbox{7}", "7", 1.0), ("\\fbox{7}", "8", 0.0),
    ("\\boxed{\\frac12}", "\\frac{1}{\\boxed{2}}", 1.0),  # a boxed reference reads the same way
    ("\\boxed{3} then \\boxed{cut off", "3", 0.0),
    ("\\boxed{0}", "0", 1.0),
])
def test_math_reward_scores_the_last_top_level_box(response, reference, expected):
    assert math_reward(response, reference) == expected


def test_deeply_nested_boxes_cost_little_and_never_raise():
    import time

    from llm.rewards import math_final_answer
    t = time.perf_counter()
    assert math_final_answer("\\boxed{" * 6000 + "1" + "}" * 6000) == "1"
    assert math_final_answer("\\boxed{" * 6000 + "1") is None
    assert math_reward("\\boxed{" * 6000 + "1" + "}" * 6000, "1") in (0.0, 1.0)
    assert time.perf_counter() - t < 10.0


def test_math_loader_takes_the_outer_box_of_a_nested_solution(tmp_path):
    rows = [{"problem": "Half?", "solution": "It is $\\boxed{\\frac{1}{\\boxed{2}}}$."},
            {"problem": "Seven?", "solution": "\\fbox{7}"}]
    probs = load_problems(_write_rows(tmp_path / "m.jsonl", rows))
    assert [p.answer for p in probs] == ["\\frac{1}{2}", "7"]
    assert math_reward(rows[0]["solution"], probs[0].answer) == 1.0


# -- repeated questions and a disjoint held-out split --------------------------------------------

def test_repeated_questions_are_dropped_and_counted(tmp_path):
    import warnings

    rows = [{"question": "How many apples?", "answer": "#### 3"},
            {"question": "  How   many\r\napples? ", "answer": "#### 3"},  # whitespace variants
            {"question": "How\tmany\napples?", "answer": "#### 4"},  # ... with another answer
            {"question": "How many pears?", "answer": "#### 5"},
            {"question": "How many pears?", "answer": "#### 5"}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probs = load_problems(_write_rows(tmp_path / "g.jsonl", rows))
    assert [(p.question, p.answer) for p in probs] == [("How many apples?", "3"), ("How many pears?", "5")]
    assert [str(w.message).split(": ", 1)[1] for w in caught] == [
        "dropped 3 of 5 rows that repeat an earlier row's question (whitespace ignored, 1 of them with a "
        "different reference answer); the first row of each question is kept"]


def _problem(question, i):
    from llm.tasks import Problem
    return Problem(id=str(i), question=question, answer=str(i), task="gsm8k")


def test_held_out_split_is_disjoint_by_question():
    from llm.tasks import split_heldout
    a, b, c = (f"How many apples does Ann have {i}?" for i in range(3))
    a_variant = "  How\r\n many apples does Ann have 0? "
    assert a_variant.split() == a.split()
    assert is_heldout(a, 10) and not is_heldout(b, 10) and not is_heldout(c, 10)  # the crc32 rule
    # by the rule: the variant of the held-out question is held out too (its raw text's crc is not 0)
    train, held = split_heldout([_problem(q, i) for i, q in enumerate([a, b, a_variant, c])])
    assert [p.id for p in train] == ["1", "3"] and [p.id for p in held] == ["0", "2"]
    # the fallback (the rule holds out nothing): every copy of the last question is held out
    train, held = split_heldout([_problem(q, i) for i, q in enumerate([b, c + " ", b, c])])
    assert [p.id for p in train] == ["0", "2"] and [p.id for p in held] == ["1", "3"]
    # one distinct question cannot be split without training on the held-out one
    with pytest.raises(ConfigError, match="1 distinct question"):
        split_heldout([_problem(q, i) for i, q in enumerate([b, b + "\n"])])


def test_loaded_file_splits_without_overlap(tmp_path):
    from llm.tasks import split_heldout

    def question_key(q):
        return " ".join(q.split())

    rows = [{"question": f"How many apples does Ann have {i}?", "answer": f"#### {i}"} for i in range(30)]
    rows += [{"question": f"How many  apples does Ann have {i}? ", "answer": f"#### {i}"} for i in range(0, 30, 3)]
    with pytest.warns(UserWarning, match="dropped 10 of 40 rows that repeat"):
        problems = load_problems(_write_rows(tmp_path / "g.jsonl", rows))
    train, held = split_heldout(problems)
    assert (len(train), len(held)) == (27, 3)  # held by the rule: questions 0, 8 and 28
    assert not {question_key(p.question) for p in train} & {question_key(p.question) for p in held}
