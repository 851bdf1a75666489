import subprocess
import sys

from deepgrpo.cli import main


def test_help_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for cmd in ("sim", "study", "report", "llm", "methods"):
        assert cmd in out


def test_methods_command(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "deep-grpo" in out and "tree-surprisal" in out


def test_unknown_command_is_a_one_line_error():
    p = subprocess.run([sys.executable, "-m", "deepgrpo.cli", "fly"], capture_output=True, text=True)
    assert p.returncode == 2 and "unknown command 'fly'" in p.stderr


def test_core_never_imports_a_backend():
    import pathlib
    import re
    root = pathlib.Path(__file__).resolve().parents[1] / "deepgrpo"
    pat = re.compile(r"^\s*(from|import)\s+(sims|llm|analysis)(\.|\s|$)", re.M)
    offenders = [p.name for p in root.glob("*.py") if p.name != "cli.py" and pat.search(p.read_text())]
    assert offenders == []
    code = ("import sys, deepgrpo, deepgrpo.explore; "
            "print(sorted(m for m in ('sims','llm','analysis','transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_public_function_of_the_core_has_a_docstring():
    import importlib
    import inspect
    import pkgutil

    import deepgrpo
    missing = []
    for info in pkgutil.iter_modules(deepgrpo.__path__):
        mod = importlib.import_module(f"deepgrpo.{info.name}")
        for name, obj in vars(mod).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and not obj.__doc__:
                missing.append(f"{mod.__name__}.{name}")
            if inspect.isclass(obj):
                for n, f in vars(obj).items():
                    fn = getattr(f, "__func__", getattr(f, "fget", f))
                    if not n.startswith("_") and inspect.isfunction(fn) and not fn.__doc__:
                        missing.append(f"{mod.__name__}.{name}.{n}")
    assert missing == []
