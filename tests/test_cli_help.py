"""The rules of the command line, checked on every sub-command's ``--help`` (issue 22).

The commands are discovered from the parsers themselves (``deepgrpo``'s command list, then every
sub-parser, recursively), so a new command is checked without being listed here:

- help is plain words: no reStructuredText or Markdown markup (back-ticks, Sphinx roles);
- every flag has a help text, and no two flags of one command share one;
- a tuple field shows its format (``--betas FLOAT,FLOAT``, default ``0.9,0.999``);
- flags are never abbreviated (``llm train --prompts 8`` is an error, not ``--prompts-per-step``);
- one vocabulary: a field has the same flag in every command, and a flag that two different
  fields share is declared one setting (:data:`deepgrpo.flags.VOCABULARY`).
"""

from __future__ import annotations

import argparse
import re
import types
import typing
from collections import defaultdict

import pytest

from deepgrpo.cli import build_parser, main
from deepgrpo.flags import VOCABULARY, flag_name, format_value, metavar

MARKUP = re.compile(r"`|:[a-z]+:`|\*\*|(?<![\w*])\*\w(?:[^*]*?\w)?\*(?![\w*])")
"""Back-ticks (RST literals and Sphinx roles such as :class:`X`, Markdown code), bold and emphasis
(``*word*``; a product such as ``lr * ratio`` is no markup)."""
DEFAULT = re.compile(r"\s*\((default: .*|required)\)$", re.S)


def _top_commands() -> list[str]:
    from deepgrpo.cli import _top_parser
    positional = next(a for a in _top_parser()._actions if a.dest == "command")
    return list(positional.choices)


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...]):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))


@pytest.fixture(scope="module")
def commands() -> dict[str, argparse.ArgumentParser]:
    """``{"llm train": parser, ...}``: every command and sub-command, found from the parsers."""
    out = {}
    for cmd in _top_commands():
        for path, parser in _walk(build_parser(cmd), (cmd,)):
            out[" ".join(path)] = parser
    return out


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings]


def test_every_command_is_found(commands):
    for name in ("sim run", "sim compare", "llm sft", "llm train", "llm eval", "study dilution", "study all",
                 "study regime-map", "study theory", "study llm-recoverability", "study llm-compare", "report",
                 "methods"):
        assert name in commands


def test_help_is_plain_words(commands):
    for name, parser in commands.items():
        text = parser.format_help()
        bad = [line.strip() for line in text.splitlines() if MARKUP.search(line)]
        assert not bad, f"deepgrpo {name} --help shows markup: {bad[:3]}"


def test_every_flag_has_its_own_help(commands):
    for name, parser in commands.items():
        seen: dict[str, str] = {}
        for action in _options(parser):
            flag = action.option_strings[-1]
            assert action.help and action.help is not argparse.SUPPRESS and action.help.strip(), \
                f"deepgrpo {name}: {flag} has no help"
            text = DEFAULT.sub("", action.help % {"default": action.default, "prog": parser.prog}).strip()
            assert text not in seen, f"deepgrpo {name}: {seen.get(text)} and {flag} share the help {text!r}"
            seen[text] = flag


def test_tuple_fields_show_their_format(commands):
    tuples = 0
    for name, parser in commands.items():
        for action in _options(parser):
            leaf = getattr(action, "leaf", None)
            if leaf is None:
                continue
            help_ = action.help % {}
            assert "(default: (" not in help_ and "(default: [" not in help_, (name, action.option_strings)
            tp = leaf.type
            optional = typing.get_origin(tp) in (typing.Union, types.UnionType)
            inner = next(a for a in typing.get_args(tp) if a is not type(None)) if optional else tp
            if typing.get_origin(inner) is not tuple:
                continue
            tuples += 1
            assert "," in action.metavar and action.metavar == metavar(tp), (name, action.option_strings)
            assert f"(default: {format_value(leaf.default)})" in help_
    assert tuples >= 2  # --betas (llm train) and --lr-grid (the simulator studies)
    betas = next(a for a in _options(commands["llm train"]) if "--betas" in a.option_strings)
    assert betas.metavar == "FLOAT,FLOAT" and betas.help.endswith("(default: 0.9,0.999)")


def test_abbreviations_are_refused_everywhere(commands):
    for name, parser in commands.items():
        assert parser.allow_abbrev is False, f"deepgrpo {name} accepts abbreviated flags"


@pytest.mark.parametrize("argv,meant", [
    (["llm", "train", "--out", "OUT", "--prompts", "8"], "--prompts-per-step"),
    (["llm", "eval", "--model", "DIR", "--eval-samp", "2"], "--eval-samples"),
    (["sim", "run", "--method", "grpo", "--ste", "3"], "--steps"),
    (["study", "dilution", "--seed", "3"], "--seeds"),
    (["study", "theory", "--spec", "3"], None),
])
def test_an_abbreviation_is_one_line_exit_2(tmp_path, capsys, monkeypatch, argv, meant):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: unrecognized arguments:" in err[0], err
    if meant:
        assert f"did you mean {meant}" in err[0]
    assert not any(tmp_path.iterdir())


def test_one_vocabulary(commands):
    flags_of_field: dict[str, set[str]] = defaultdict(set)
    fields_of_flag: dict[str, set[str]] = defaultdict(set)
    for name, parser in commands.items():
        for action in _options(parser):
            setting = getattr(action, "setting", None)
            if setting is None:
                continue
            flag = action.option_strings[0]
            owner, field = setting.split(".")
            assert flag == "--" + flag_name(owner, field), (name, setting, flag)
            flags_of_field[setting].add(flag)
            fields_of_flag[flag].add(setting)
    for setting, flags in flags_of_field.items():
        assert len(flags) == 1, f"{setting} has the flags {sorted(flags)} in different commands"
    for flag, fields in fields_of_flag.items():
        if len(fields) > 1:  # different fields under one flag: declared one setting
            declared = set(VOCABULARY.get(flag[2:], ()))
            assert fields <= declared, f"{flag} sets {sorted(fields)}: declare them one setting in VOCABULARY"
    for flag, fields in VOCABULARY.items():  # the vocabulary names real fields
        for f in fields:
            assert f in flags_of_field, f"VOCABULARY[{flag!r}] names {f}, which no command has"


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in _options(parser) for o in a.option_strings}


def test_the_settings_of_issue_22_have_one_flag_each(commands):
    llm = [commands[c] for c in ("llm sft", "llm train", "llm eval")]
    for flag in ("--eval-temperature", "--eval-seed", "--eval-problems", "--eval-samples", "--eval-pass-k"):
        assert all(flag in _flags(p) for p in llm), flag
    assert "--eval-max-response-tokens" in _flags(commands["llm sft"]) & _flags(commands["llm eval"])
    assert {"--eval-problems", "--eval-samples", "--prompts-per-step"} <= _flags(commands["study llm-compare"])
    assert "--prompts-per-step" in _flags(commands["llm train"])
    for c in ("llm train", "study llm-recoverability"):
        assert {"--max-response-tokens", "--temperature"} <= _flags(commands[c]), c
    gone = {"--prompts", "--max-tokens", "--sampling-max-response-tokens", "--sampling-temperature", "--samples",
            "--pass-k", "--quiet", "--steps-cap", "--warmup-steps", "--kind", "--checkpoint", "--batch-problems"}
    for name, parser in commands.items():
        assert not _flags(parser) & gone, (name, _flags(parser) & gone)
    # the same input and the same settings under one name in the simulator and the LLM commands
    for name in ("llm train", "llm eval", "study llm-compare", "study llm-recoverability"):
        assert "--model" in _flags(commands[name]), name
    for name in ("sim run", "sim compare"):
        assert {"--prompts-per-step", "--eval-pass-k"} <= _flags(commands[name]), name
    for name in ("llm sft", "llm eval"):  # the evaluation's temperature is --eval-temperature there too
        assert "--temperature" not in _flags(commands[name]) and "--seed" not in _flags(commands["llm eval"])


def test_eval_seed_is_accepted_by_llm_eval(tmp_path):
    from llm.cli import EVAL_OPTIONS, LLMEvalSettings
    from llm.cli import build_parser as llm_parser
    a = llm_parser("deepgrpo llm").parse_args(["eval", "--model", str(tmp_path), "--eval-seed", "7",
                                               "--eval-temperature", "0.5", "--set", "eval-samples=3"])
    cfg, _ = EVAL_OPTIONS.resolve(a, LLMEvalSettings())
    assert (cfg.eval.seed, cfg.eval.temperature, cfg.eval.samples) == (7, 0.5, 3)


def test_llm_train_refuses_an_evaluation_cap_it_would_not_use_and_records_the_one_it_uses():
    from deepgrpo.config import ConfigError
    from llm.cli import build_parser as llm_parser
    from llm.cli import resolve_train
    p = llm_parser("deepgrpo llm")
    cfg = resolve_train(p.parse_args(["train", "--out", "OUT", "--max-response-tokens", "40"]))
    assert cfg.eval.max_response_tokens == cfg.sampling.max_response_tokens == 40  # what config.json records
    same = resolve_train(p.parse_args(["train", "--out", "OUT", "--max-response-tokens", "40",
                                       "--set", "eval.max_response_tokens=40"]))
    assert same.eval.max_response_tokens == 40
    with pytest.raises(ConfigError, match=r"--set: train.eval.max_response_tokens = 10 is invalid: .*--max-response-"
                                          r"tokens \(now 40\)"):
        resolve_train(p.parse_args(["train", "--out", "OUT", "--max-response-tokens", "40",
                                    "--set", "eval-max-response-tokens=10"]))
    assert "--eval-max-response-tokens" not in _flags(p._subparsers._group_actions[0].choices["train"])


def test_data_arith_is_the_built_in_task_in_llm_train_too():
    from llm.cli import build_parser as llm_parser
    from llm.cli import resolve_train
    p = llm_parser("deepgrpo llm")
    for argv in (["--data", "arith"], ["--data", "tiny-arith"], []):
        assert resolve_train(p.parse_args(["train", "--out", "OUT", *argv])).data is None, argv
