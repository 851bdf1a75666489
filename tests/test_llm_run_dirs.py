"""LLM run directories (``deepgrpo llm train/sft/eval --out``): what is in them and who may write
them. A checkpoint's state is data, never code; one process writes a directory at a time; a
resume continues only the run the checkpoint belongs to; evaluation results live outside the
checkpoint; metrics are strict JSON; sizes that cannot fit are refused before anything is
written; temporary files of interrupted writes are cleaned up; held-out questions are never
trained on. Everything runs on a micro model built from a config (seconds on a CPU)."""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from llm.tasks import DATA_DIR

DATA = DATA_DIR / "arith_sample.jsonl"
VOLATILE = ("time_explore_s", "time_update_s", "wall_time_s")


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> tuple[Path, Path]:
    """(micro model directory, an evaluation file disjoint from the sample problems)."""
    from llm.testing import save_micro_model, write_arith_heldout
    base = tmp_path_factory.mktemp("micro")
    return save_micro_model(base / "model"), write_arith_heldout(base / "heldout.jsonl")


def _train_args(micro: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    model, heldout = micro
    return ["train", "--model", str(model), "--data", str(DATA), "--eval-data", str(heldout), "--method", "grpo",
            "--G", "2", "--prompts-per-step", "2", "--steps", "2", "--eval-problems", "2", "--eval-samples", "0",
            "--max-response-tokens", "20", "--threads", "1", "--no-tensorboard", "--checkpoint-every", "1",
            "--seed", "3", *extra, "--out", str(out)]


def _cli(args: list[str], capsys: pytest.CaptureFixture | None = None) -> tuple[int, str, str]:
    """Run ``deepgrpo llm ARGS`` in this process: (exit code, stdout, stderr)."""
    from deepgrpo.cli import main
    try:
        code = main(["llm", *args])
    except SystemExit as e:
        code = int(e.code)
    if capsys is None:
        return code, "", ""
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _one_error_line(code: int, err: str, *fragments: str) -> str:
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err[-1500:])
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def _rows(run: Path) -> list[dict]:
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _stable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


@pytest.fixture(scope="module")
def run(micro, tmp_path_factory) -> Path:
    """A finished 2-step GRPO run (checkpoint at every step); tests work on copies."""
    out = tmp_path_factory.mktemp("run") / "run"
    code, _, _ = _cli(_train_args(micro, out))
    assert code == 0
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


class _MakesADirectory:
    """Unpickled, this would create a directory: what a crafted trainer_state.pt could do."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_checkpoint_state_is_data_and_a_pickle_that_runs_code_is_refused(run, tmp_path, capsys):
    state = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2 and state["config"]["method"] == "grpo" and len(state["rows"]) == 3
    copy = _copy(run, tmp_path)
    marker = tmp_path / "code-ran"
    torch.save({"step": _MakesADirectory(marker), "data_pos": 0, "optimizer": {}, "rows": [], "config": {}},
               copy / "checkpoint" / "trainer_state.pt")
    metrics = (copy / "metrics.jsonl").read_bytes()
    code, _, err = _cli(["train", "--resume", "--steps", "3", "--out", str(copy)], capsys)
    _one_error_line(code, err, "--resume", "trainer_state.pt", "could run code")
    assert not marker.exists()
    assert (copy / "metrics.jsonl").read_bytes() == metrics


def test_a_directory_another_process_writes_is_refused(micro, run, tmp_path, capsys):
    """The lock of ``--out`` held elsewhere (another open file description, as another process
    would hold it): train, resume, sft and eval refuse in one line and write nothing."""
    from deepgrpo.records import lock_path
    copy = _copy(run, tmp_path)
    metrics = (copy / "metrics.jsonl").read_bytes()
    eval_out = tmp_path / "ev.json"
    commands = [
        (_train_args(micro, tmp_path / "new"), tmp_path / "new"),
        (["train", "--resume", "--steps", "3", "--out", str(copy)], copy),
        (["sft", "--steps", "1", "--batch-size", "2", "--eval-problems", "2", "--eval-samples", "0", "--threads", "1",
          "--out", str(tmp_path / "sft")], tmp_path / "sft"),
        (["eval", "--model", str(copy), "--eval-problems", "2", "--eval-samples", "0",
          "--eval-max-response-tokens", "20", "--threads", "1", "--out", str(eval_out)], eval_out),
    ]
    for args, target in commands:
        with open(lock_path(target), "a+") as held:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            code, _, err = _cli(args, capsys)
        _one_error_line(code, err, "--out", "in use")
    assert not (tmp_path / "new").exists() and not (tmp_path / "sft").exists() and not eval_out.exists()
    assert (copy / "metrics.jsonl").read_bytes() == metrics


def test_resume_refuses_a_checkpoint_written_with_another_config(run, tmp_path, capsys):
    """Two runs wrote to one directory: config.json says deep-grpo, the checkpoint is GRPO's."""
    copy = _copy(run, tmp_path)
    record = json.loads((copy / "config.json").read_text())
    record["train"]["method"] = "deep-grpo"
    (copy / "config.json").write_text(json.dumps(record))
    code, _, err = _cli(["train", "--resume", "--steps", "3", "--out", str(copy)], capsys)
    _one_error_line(code, err, "--resume", "method = 'grpo'", "'deep-grpo'")
    assert len(_rows(copy)) == 3


def test_eval_writes_beside_the_checkpoint_and_survives_the_next_save(run, tmp_path, capsys):
    copy = _copy(run, tmp_path)
    code, out, err = _cli(["eval", "--model", str(copy), "--eval-problems", "2", "--eval-samples", "0",
                           "--eval-max-response-tokens", "20", "--threads", "1"], capsys)
    assert code == 0, err
    written = copy / "eval" / "arith.json"
    assert json.loads(out.strip().splitlines()[-1])["out"] == str(written)
    assert f"results written to {written}" in err  # said in words, not only in the JSON
    result = written.read_bytes()
    assert json.loads(result)["checkpoint"] == str(copy / "checkpoint")
    # naming the run's checkpoint directory itself writes to the same place, beside it
    code, out, err = _cli(["eval", "--model", str(copy / "checkpoint"), "--eval-problems", "2",
                           "--eval-samples", "0", "--eval-max-response-tokens", "20", "--threads", "1"], capsys)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["out"] == str(written) and written.read_bytes() == result
    assert not (copy / "checkpoint" / "eval").exists()
    code, _, err = _cli(["train", "--resume", "--steps", "3", "--out", str(copy)], capsys)
    assert code == 0, err
    assert written.read_bytes() == result and not list((copy / "checkpoint").glob("eval*"))
    # an --out that cannot be written is refused before the evaluation
    (tmp_path / "afile").write_text("x")
    code, out, err = _cli(["eval", "--model", str(copy), "--eval-problems", "2", "--eval-samples", "0",
                           "--out", str(tmp_path / "afile" / "ev.json")], capsys)
    _one_error_line(code, err, "--out", "afile")
    assert out == ""


def test_a_nonfinite_gradient_norm_warns_once_and_metrics_stay_strict_json(micro, tmp_path, capsys, monkeypatch):
    import llm.trainer
    real = llm.trainer.update_policy

    def infinite_norm(*args, **kwargs):
        metrics = real(*args, **kwargs)
        return {**metrics, "grad_norm": math.inf}

    monkeypatch.setattr(llm.trainer, "update_policy", infinite_norm)
    out = tmp_path / "run"
    code, _, err = _cli(_train_args(micro, out, "--steps", "3"), capsys)
    assert code == 0, err
    warned = [line for line in err.splitlines() if "warning" in line]
    assert len(warned) == 1 and "step 1" in warned[0] and "inf" in warned[0], err
    rows = _rows(out)  # strict JSON: no NaN / Infinity literals
    assert [r["grad_norm"] for r in rows[1:]] == [None] * 3
    assert [r["grad_norm_nonfinite"] for r in rows[1:]] == [1.0] * 3
    # `deepgrpo report --llm-runs` reads the nulls
    from analysis.llm_runs import load_llm_run, runs_table
    table = runs_table([load_llm_run(out)])
    assert len(table) == 4 and table["grad_norm"].isna().sum() == 4


@pytest.mark.parametrize("flags,option,why", [
    (["--method", "deep-grpo", "--G", "1000000"], "--G", "memory"),
    (["--method", "deep-grpo", "--K", "1000000"], "--K", "memory"),
    (["--method", "deep-grpo", "--prompts-per-step", "1000000000"], "--prompts-per-step", "memory"),
    (["--max-response-tokens", "1000000000"], "--max-response-tokens", "context"),
    (["--max-response-tokens", "90"], "--max-response-tokens", "context"),  # prompt + 90 > 96
    (["--data", "arith", "--eval-problems", "1000000000"], "--eval-problems", "memory"),  # the built-in held-out set
])
def test_sizes_that_cannot_fit_are_refused_before_anything_is_written(micro, tmp_path, capsys, flags, option, why):
    model, heldout = micro
    out = tmp_path / "run"
    data = [] if flags[:2] == ["--data", "arith"] else ["--data", str(DATA), "--eval-data", str(heldout)]
    flags = flags[2:] if not data else flags
    args = ["train", "--model", str(model), *data, "--threads", "1", "--no-tensorboard", *flags, "--out", str(out)]
    code, _, err = _cli(args, capsys)
    _one_error_line(code, err, option, why)
    assert not out.exists()


def test_a_prompt_or_response_longer_than_the_context_is_refused(micro, tmp_path, capsys):
    model, heldout = micro
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"question": "+".join(["1"] * 100) + "=", "answer": "100"}) + "\n"
                    + DATA.read_text())
    out = tmp_path / "run"
    code, _, err = _cli(["train", "--model", str(model), "--data", str(long), "--eval-data", str(heldout),
                         "--out", str(out)], capsys)
    _one_error_line(code, err, "--data", "long.jsonl", "context of 96 tokens")
    assert not out.exists()
    for flags, option in ((["--eval-max-response-tokens", "1000000000"], "--eval-max-response-tokens"),
                          (["--eval-problems", "1000000000"], "--eval-problems")):
        code, _, err = _cli(["eval", "--model", str(model), *flags, "--out", str(tmp_path / "ev.json")], capsys)
        _one_error_line(code, err, option)
    assert not (tmp_path / "ev.json").exists()


def test_preset_sizes_are_checked_before_its_sft_start_is_trained(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = _cli(["train", "--preset", "tiny-arith", "--method", "deep-grpo", "--G", "1000000",
                         "--out", str(out)], capsys)
    _one_error_line(code, err, "--G", "memory")
    assert not out.exists()


def test_stale_temporary_files_are_removed_and_an_interrupted_swap_is_recovered(run, tmp_path, capsys):
    copy = _copy(run, tmp_path)
    (copy / ".checkpoint.k2j3.tmp").mkdir()
    (copy / ".checkpoint.k2j3.tmp" / "model.safetensors").write_bytes(b"half")
    (copy / ".metrics.jsonl.x81.tmp").write_text('{"step": 1')
    os.replace(copy / "checkpoint", copy / ".checkpoint.prev")  # killed between the swap's two renames
    code, _, err = _cli(["train", "--resume", "--steps", "3", "--out", str(copy)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in copy.iterdir() if p.name.startswith(".")) == []
    assert torch.load(copy / "checkpoint" / "trainer_state.pt", weights_only=True)["step"] == 3
    assert _stable(_rows(copy))[:3] == _stable(_rows(run))


def test_recover_interrupted_puts_the_newest_complete_checkpoint_in_place(tmp_path):
    from llm.checkpoint import STATE_FILE, recover_interrupted

    def ckpt(name: str, step: int) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / STATE_FILE).write_text(str(step))
        return tmp_path / name

    def step() -> int:
        return int((tmp_path / "checkpoint" / STATE_FILE).read_text())

    cases = [({"checkpoint": 1, ".checkpoint.new": 2}, 2),  # killed after the new one was complete
             ({".checkpoint.prev": 1, ".checkpoint.new": 2}, 2),  # between the swap's renames
             ({".checkpoint.prev": 1}, 1),
             ({"checkpoint": 2, ".checkpoint.prev": 1}, 2)]  # after the swap, before removing the previous one
    for dirs, expected in cases:
        for name, s in dirs.items():
            ckpt(name, s)
        recover_interrupted(tmp_path / "checkpoint")
        assert step() == expected and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"], dirs
        shutil.rmtree(tmp_path / "checkpoint")


def test_ctrl_c_waits_for_the_checkpoint_swap_to_end():
    from deepgrpo.records import signals_held
    reached = False
    # Python's own Ctrl-C handler, whatever this process inherited (a shell's background job starts
    # with SIGINT ignored, and the held signal then goes where it was meant to: nowhere)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_held():
                os.kill(os.getpid(), signal.SIGINT)
                reached = True  # not interrupted inside the block
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert reached


def test_resuming_a_run_that_stopped_before_its_first_checkpoint_starts_it_again(micro, run, tmp_path, capsys):
    copy = _copy(run, tmp_path)
    shutil.rmtree(copy / "checkpoint")
    code, _, err = _cli(["train", "--resume", "--out", str(copy)], capsys)
    assert code == 0 and "starting it again from step 0" in err, err
    assert _stable(_rows(copy)) == _stable(_rows(run))


def test_data_errors_name_the_file_and_held_out_questions_are_never_trained_on(micro, tmp_path, capsys):
    from llm.models import build_char_tokenizer
    from llm.tasks import load_problems, question_key
    from llm.trainer import TrainConfig, load_run_data
    model, _ = micro
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"question": "1+2=", "answer": "3"}) + "\n")
    code, _, err = _cli(["train", "--model", str(model), "--data", str(one), "--out", str(tmp_path / "o")], capsys)
    _one_error_line(code, err, "--data = ", "one.jsonl", "pass --eval-data")
    # an evaluation file sharing 3 questions (one with other whitespace) with the training file
    train = load_problems(DATA)
    overlap = tmp_path / "overlap.jsonl"
    rows = [{"question": p.question, "answer": p.answer} for p in train[:2]]
    rows += [{"question": f"  {train[2].question} ", "answer": train[2].answer}, {"question": "2+2=", "answer": "4"}]
    overlap.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = build_char_tokenizer()
    cfg = TrainConfig(model=str(model), data=str(DATA), eval_data=str(overlap), method="grpo")
    with pytest.warns(UserWarning, match=r"dropped 3 of 8 problems .*overlap\.jsonl"):
        data = load_run_data(cfg, tok)
    trained = {question_key(p.question) for p in data.stream.problems}
    assert len(trained) == 5 and not trained & {question_key(r["question"]) for r in rows}
    code, _, err = _cli(["train", "--model", str(model), "--data", str(DATA), "--eval-data", str(DATA),
                         "--out", str(tmp_path / "o")], capsys)
    _one_error_line(code, err, "--data = ", "also in --eval-data")
    assert not (tmp_path / "o").exists()
    # the built-in arithmetic stream with an evaluation file: evaluated on the file, never trains on its questions
    from llm.tasks import ArithmeticStream
    plain = ArithmeticStream(seed=0)
    taken = [plain.problem_at(i) for i in (0, 2, 3)]
    held_file = tmp_path / "held.jsonl"
    held_file.write_text("".join(json.dumps({"question": p.question, "answer": p.answer}) + "\n" for p in taken))
    data = load_run_data(TrainConfig(model=str(model), data=None, eval_data=str(held_file), method="grpo"), tok)
    assert [p.problem.question for p in data.heldout] == [p.question for p in taken]
    drawn = [data.stream.problem_at(i).question for i in range(40)]
    assert not set(drawn) & {p.question for p in taken}
    assert [drawn[i] for i in (1, 4, 5)] == [plain.problem_at(i).question for i in (1, 4, 5)]


def test_a_full_disk_is_recognised_behind_a_serializers_own_error(tmp_path):
    """torch and safetensors report a write that hit a full disk as their own error types (a
    RuntimeError raised while handling the OSError, or "os error 28" in the text): such a
    failure is turned into ENOSPC naming the file, and anything else is left alone."""
    import errno

    from llm.checkpoint import plain_state
    from llm.models import no_space_left
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None
    except RuntimeError as e:
        assert no_space_left(tmp_path, e)
    assert no_space_left(tmp_path, ValueError("Error while serializing: I/O error: (os error 28)"))
    assert not no_space_left(tmp_path, RuntimeError("some other failure"))
    with pytest.raises(TypeError, match=r"state\['x'\]\[1\] is a _MakesADirectory"):
        plain_state({"x": [1, _MakesADirectory(tmp_path / "no")]})
