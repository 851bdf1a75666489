"""Command-line options generated from config dataclasses, and the layering of their sources.

Every command declares its settings once, as a dataclass tree (:class:`OptionSet`); its flags,
their help (from the dataclasses' docstrings, shown as plain text) and their defaults (from the
fields) are generated, and every field can be set. The sources are layered the same way
everywhere:

    defaults < method preset < ``--config FILE`` (JSON or YAML) < explicit flags < ``--set KEY=VALUE``

and every value goes through :mod:`deepgrpo.overrides` (typed by the field's annotation).

One vocabulary: a field's flag depends on the field alone (its class and name), never on the
command it appears in, so the same setting has the same flag in every command
(:data:`VOCABULARY`, :func:`flag_name`). Flags are never abbreviated (:class:`OneLineParser`).
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepgrpo.config import ConfigError
from deepgrpo.overrides import (
    Leaf,
    apply_overrides,
    coerce,
    field_docs,
    field_types,
    flatten_mapping,
    leaves,
    parse_assignments,
    resolve_key,
    short_names,
    type_name,
)

_DEST = "cfg:"

VOCABULARY: dict[str, tuple[str, ...]] = {
    # the held-out evaluation of the LLM commands (sft, train, eval, study llm-compare): --eval-*
    "eval-problems": ("EvalConfig.n_problems", "LLMCompareConfig.eval_problems"),
    "eval-samples": ("EvalConfig.samples", "LLMCompareConfig.eval_samples"),
    # the k of the pass@k an evaluation reports (the LLM's held-out one; the simulator's exact one)
    "eval-pass-k": ("EvalConfig.pass_k", "RunnerConfig.pass_k"),
    "eval-temperature": ("EvalConfig.temperature",),
    "eval-max-response-tokens": ("EvalConfig.max_response_tokens",),
    "eval-seed": ("EvalConfig.seed",),
    # sampling of the LLM commands (llm train, study llm-recoverability)
    "max-response-tokens": ("SamplingConfig.max_response_tokens", "LLMRecoverabilityConfig.max_tokens"),
    "temperature": ("SamplingConfig.temperature", "LLMRecoverabilityConfig.temperature"),
    # problems (prompts) per training step, in the simulator too
    "prompts-per-step": ("TrainConfig.prompts_per_step", "LLMCompareConfig.prompts_per_step",
                         "RunnerConfig.batch_problems"),
    "n-problems": ("TokenTreeSpec.n_problems", "LLMRecoverabilityConfig.prompts"),
    "spec-seed": ("TokenTreeSpec.seed",),
    "estimator": ("EstimatorConfig.kind",),
    # a run's loop and optimiser, in whichever command trains
    "seed": ("SFTConfig.seed", "TrainConfig.seed", "LLMRecoverabilityConfig.seed", "TheoryOptions.seed"),
    "steps": ("RunnerConfig.steps", "SFTConfig.steps", "TrainConfig.steps", "LLMCompareConfig.steps_cap"),
    "budget": ("RunnerConfig.budget", "TrainConfig.budget", "LLMCompareConfig.budget", "SimStudyOptions.budget"),
    "budget-unit": ("RunnerConfig.budget_unit", "TrainConfig.budget_unit", "SimStudyOptions.budget_unit"),
    "lr": ("RunnerConfig.lr", "SFTConfig.lr", "TrainConfig.lr", "LLMCompareConfig.lr"),
    "lr-warmup-steps": ("SFTConfig.warmup_steps", "TrainConfig.lr_warmup_steps", "LLMCompareConfig.lr_warmup_steps"),
    "weight-decay": ("SFTConfig.weight_decay", "TrainConfig.weight_decay"),
    "max-grad-norm": ("RunnerConfig.max_grad_norm", "SFTConfig.max_grad_norm", "TrainConfig.max_grad_norm"),
    "micro-batch-size": ("RunnerConfig.micro_batch_size", "TrainConfig.micro_batch_size"),
    "bf16": ("SFTConfig.bf16", "TrainConfig.bf16"),
    "eval-every": ("SFTConfig.eval_every", "TrainConfig.eval_every"),
    "policy": ("RunnerConfig.policy", "SimStudyOptions.policy"),
    "optimizer": ("RunnerConfig.optimizer", "SimStudyOptions.optimizer"),
    # what a command runs on and with
    "model": ("TrainConfig.model", "LLMCompareConfig.model", "LLMRecoverabilityConfig.model"),
    "data": ("TrainConfig.data", "LLMRecoverabilityConfig.data"),
    "task": ("TrainConfig.task", "LLMRecoverabilityConfig.task"),
    "segmenter": ("TrainConfig.segmenter", "LLMRecoverabilityConfig.segmenter"),
    "engine": ("TrainConfig.engine", "LLMRecoverabilityConfig.engine"),
    "threads": ("TrainConfig.threads", "LLMCompareConfig.threads", "LLMRecoverabilityConfig.threads"),
    "G": ("ExploreConfig.G", "LLMRecoverabilityConfig.G"),
    "K": ("ExploreConfig.K", "LLMRecoverabilityConfig.K", "TheoryOptions.K"),
    # studies
    "seeds": ("LLMCompareConfig.seeds", "SimStudyOptions.seeds", "RegimeMapOptions.seeds", "SimCompareSettings.seeds"),
    "workers": ("SimStudyOptions.workers", "RegimeMapOptions.workers"),
}
"""The command line's vocabulary: ``{flag: the fields ("Class.field") that hold this setting}``.

A field listed here gets this flag in every command; any other field's flag is its own name
(``--kl-coef`` for ``kl_coef``). A flag generated from two different fields (in one command or
in several) must be declared here for both: they are then one setting under one name (e.g. the
held-out size is ``EvalConfig.n_problems`` in ``llm eval`` and ``LLMCompareConfig.eval_problems``
in ``study llm-compare``: ``--eval-problems`` in both). ``tests/test_cli_help.py`` checks it."""

_FLAG_OF_FIELD = {f: flag for flag, fields in VOCABULARY.items() for f in fields}


def flag_name(owner: str, name: str) -> str:
    """The flag (without ``--``) of field ``name`` of config class ``owner`` in every command:
    its :data:`VOCABULARY` entry, else the field's name with dashes (``kl_coef`` -> ``kl-coef``)."""
    return _FLAG_OF_FIELD.get(f"{owner}.{name}", name.replace("_", "-"))


_ROLE = re.compile(r":[a-z]+:`~?([^`<]*?)\s*(?:<[^>]*>)?`")
_EMPHASIS = re.compile(r"(?<![\w*])\*{1,2}(\w(?:[^*]*?\w)?)\*{1,2}(?![\w*])")


def plain_text(text: str) -> str:
    """``text`` (a docstring's description) without reStructuredText markup: roles such as
    :class:`~a.B` become their name (``B``; ``a.B`` without the ``~``), double and single back-ticks
    and the stars of emphasis (``*sample*``, ``**both**``) are dropped, and whitespace is collapsed to
    single spaces (``lr * ratio`` keeps its star)."""
    def role(m: re.Match[str]) -> str:
        target = m.group(1)
        return target.rsplit(".", 1)[-1] if m.group(0).split("`", 1)[1].startswith("~") else target
    text = _ROLE.sub(role, text)
    text = text.replace("``", "").replace("`", "")
    text = _EMPHASIS.sub(r"\1", text)
    return " ".join(text.split())


def format_value(value: Any) -> str:
    """``value`` as it would be written on the command line: ``none``, ``on``/``off``,
    ``0.9,0.999`` for a tuple, JSON for a mapping, ``empty`` for an empty string."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return ",".join(format_value(v) for v in value) if value else "empty"
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, str):
        return value if value else "empty"
    return str(value)


def metavar(tp: Any) -> str:
    """The metavar of a field of annotation ``tp``: ``INT``, ``FLOAT|none``, ``FLOAT,FLOAT``
    (a pair), ``FLOAT,...`` (any number), ``TEXT``, ``JSON``."""
    name = type_name(tp)
    optional = name.endswith(" or none")
    inner = tp
    if optional:
        inner = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(inner) is tuple:
        args = typing.get_args(inner)
        variable = bool(args) and args[-1] is Ellipsis
        items = [metavar(a) for a in (args[:1] if variable else args)] or ["VALUE"]
        meta = ",".join(items) + (",..." if variable else "")
    else:
        meta = "VALUE"
        for word, m in (("integer", "INT"), ("number", "FLOAT"), ("string", "TEXT"), ("JSON", "JSON")):
            if word in name:
                meta = m
                break
    return meta + ("|none" if optional else "")


class UsageError(ConfigError):
    """A command-line argument error: a :class:`ConfigError`, so ``deepgrpo`` prints it as one
    line ``deepgrpo CMD: error: ...`` and exits 2."""


_LEAF = "_deepgrpo_parser"


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit code 2 (raised as :class:`UsageError`)
    instead of a usage block; ``--help`` is unchanged. Flags are never abbreviated
    (``allow_abbrev=False``: ``--prompts`` is not ``--prompts-per-step``); an unknown flag is
    answered with the closest real one. Every command's parser and sub-parser is one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def add_subparsers(self, **kwargs: Any) -> Any:
        """Sub-parsers that are :class:`OneLineParser` too."""
        kwargs.setdefault("parser_class", OneLineParser)
        return super().add_subparsers(**kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        """Raise :class:`UsageError` with ``message`` (argparse would print its usage and exit)."""
        raise UsageError(message)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        """argparse's, remembering which (sub-)parser met the first unknown argument."""
        ns, extras = super().parse_known_args(args, namespace)
        if extras and not hasattr(ns, _LEAF):  # the innermost sub-parser answers first
            setattr(ns, _LEAF, self)
        return ns, extras

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        """argparse's; unknown arguments are one :class:`UsageError` naming the closest flags."""
        ns, extras = self.parse_known_args(args, namespace)
        leaf = vars(ns).pop(_LEAF, self)
        if extras:
            self.error(_unrecognized(extras, leaf))
        return ns


def _unrecognized(extras: list[str], parser: argparse.ArgumentParser) -> str:
    """argparse's "unrecognized arguments" message, with the closest flag of ``parser`` for
    each unknown one (an abbreviation names the flags it abbreviates)."""
    known = [o for o in parser._option_string_actions if o.startswith("--")]
    hints = []
    for arg in extras:
        if not arg.startswith("--"):
            continue
        name = arg.split("=", 1)[0]
        longer = sorted(o for o in known if o.startswith(name))
        if longer:
            hints.append(f"{name} is not a flag, and flags are never abbreviated (did you mean "
                         f"{' or '.join(longer[:3])}?)")
            continue
        close = sorted(o for o in known if o.endswith("-" + name[2:])) or difflib.get_close_matches(name, known, n=2)
        if close:
            hints.append(f"{name} is not a flag (did you mean {' or '.join(close[:3])}?)")
    return f"unrecognized arguments: {' '.join(extras)}" + (f"; {'; '.join(hints)}" if hints else "")


def load_config_file(path: str | Path, option: str = "--config") -> dict[str, Any]:
    """The mapping in a JSON (``.json``) or YAML (``.yaml``/``.yml``) file; any problem is a
    :class:`ConfigError` naming ``option`` and the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{option} = {str(path)!r} is invalid: no such file", owner=option, value=str(path),
                          allowed="an existing JSON or YAML file")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{option} = {str(path)!r} is invalid: {p.stat().st_size:,} bytes, more than a settings "
                          f"file holds (at most {MAX_CONFIG_BYTES:,})", owner=option, value=str(path),
                          allowed=f"a JSON or YAML file of at most {MAX_CONFIG_BYTES:,} bytes")
    text = p.read_text(errors="replace")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            data = _load_yaml(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - JSON and YAML raise different types; both mean "not parsable"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{option} = {str(path)!r} is invalid: not parsable ({first})", owner=option,
                          value=str(path), allowed="a JSON or YAML mapping") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{option} = {str(path)!r} is invalid: expected a mapping at the top level, got "
                          f"{type(data).__name__}", owner=option, value=str(path), allowed="a mapping")
    return dict(data)


MAX_CONFIG_BYTES = 1 << 20
"""Largest settings file read (1 MiB)."""
MAX_YAML_ALIASES = 100
"""Most YAML aliases (``*name``) a settings file may use: a few anchors shorten a file, while
nested aliases ("billion laughs") would expand to more values than memory holds."""
MAX_CONFIG_VALUES = 100_000
"""Most values a YAML settings file may hold once its aliases are expanded."""


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load(text)`` that refuses more than :data:`MAX_YAML_ALIASES` aliases."""
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        aliases = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > MAX_YAML_ALIASES:
                    raise yaml.YAMLError(f"more than {MAX_YAML_ALIASES} aliases (*name)")
            return super().compose_node(parent, index)

    loader = BoundedLoader(text)
    try:
        data = loader.get_single_data()
    finally:
        loader.dispose()
    sizes: dict[int, int] = {}

    def expanded(x: Any) -> int:  # values the data holds with every alias expanded (memoised on shared ones)
        if id(x) not in sizes:
            items = x.values() if isinstance(x, dict) else x if isinstance(x, list) else ()
            sizes[id(x)] = 1 + sum(expanded(v) for v in items)
        return sizes[id(x)]

    if expanded(data) > MAX_CONFIG_VALUES:
        raise yaml.YAMLError(f"its aliases expand to more than {MAX_CONFIG_VALUES:,} values")
    return data


@dataclass
class OptionSet:
    """The settings of one command.

    cls: the dataclass tree (e.g. a dataclass with fields ``algo: AlgoConfig``,
        ``spec: TokenTreeSpec``, ``runner: RunnerConfig``).
    reserved: names of the command's own (non-config) arguments (``out``, ``seed``...); a
        field whose flag would be one of them is a programming error (give it a
        :data:`VOCABULARY` entry).
    hidden: dotted keys that get no flag (still settable by ``--set`` and ``--config``).

    Each field's flag is :func:`flag_name` of its class and name (the same in every command);
    ``--set`` and ``--config`` take a dotted key, a flag's name (``eval-seed`` or
    ``eval_seed``) or a field's shortest unambiguous name (:func:`~deepgrpo.overrides.short_names`).
    """

    cls: type
    reserved: Iterable[str] = ()
    hidden: Iterable[str] = ()
    names: dict[str, Leaf] = field(init=False)
    flags: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.reserved = tuple(self.reserved)
        self.hidden = tuple(self.hidden)
        all_leaves = leaves(self.cls)
        by_flag: dict[str, Leaf] = {}
        for leaf in all_leaves:
            name = flag_name(leaf.owner.__name__, leaf.name)
            other = by_flag.get(name)
            if other is not None or name.replace("-", "_") in self.reserved:
                what = f"{other.key}" if other is not None else "an argument of the command"
                raise ValueError(f"{self.cls.__name__}: --{name} would set both {leaf.key} and {what}; give one of "
                                 "them its own flag in deepgrpo.flags.VOCABULARY")
            by_flag[name] = leaf
        self.flags = {leaf.key: "--" + name for name, leaf in by_flag.items()}
        self.names = short_names(all_leaves, self.reserved)
        self.names.update({name.replace("-", "_"): leaf for name, leaf in by_flag.items()})  # a flag's name wins

    def flag(self, leaf: Leaf) -> str:
        """The flag of ``leaf`` (``--G``, ``--kl-coef``, ``--spec-seed``), or ``--set`` for a hidden one."""
        return "--set" if leaf.key in self.hidden else self.flags[leaf.key]

    def add_arguments(self, parser: argparse.ArgumentParser, layering: bool = True) -> None:
        """Add one flag per field (grouped by section, help from the docstrings in plain text,
        the default as it would be typed) and, with ``layering``, ``--config FILE`` and
        ``--set KEY=VALUE``. Each flag's action carries ``setting = "Class.field"`` and its
        :class:`~deepgrpo.overrides.Leaf` as ``leaf``."""
        groups: dict[str, Any] = {}
        for leaf in leaves(self.cls):  # in declaration order
            if leaf.key in self.hidden:
                continue
            section = leaf.path[:-1]
            title = ".".join(section) or "settings"
            if title not in groups:
                groups[title] = parser.add_argument_group(title, self._section_doc(section))
            default = "required" if leaf.required else f"default: {format_value(leaf.default)}"
            help_ = f"{plain_text(leaf.doc)} ({default})".replace("%", "%%")
            flag = self.flags[leaf.key]
            if leaf.type is bool:
                action = groups[title].add_argument(flag, dest=_DEST + leaf.key, action=argparse.BooleanOptionalAction,
                                                    default=argparse.SUPPRESS, help=help_)
            else:
                action = groups[title].add_argument(flag, dest=_DEST + leaf.key, default=argparse.SUPPRESS,
                                                    help=help_, metavar=metavar(leaf.type))
            action.setting = f"{leaf.owner.__name__}.{leaf.name}"  # type: ignore[attr-defined]
            action.leaf = leaf  # type: ignore[attr-defined]
        if not layering:
            return
        parser.add_argument("--config", default=None, metavar="FILE",
                            help="JSON or YAML file of settings (sections as in the run's resolved config, or "
                                 "KEY: VALUE pairs as for --set); flags and --set override it")
        example = ""
        for leaf in [leaf for leaf in leaves(self.cls) if leaf.key not in self.hidden
                     and isinstance(leaf.default, (int, float)) and not isinstance(leaf.default, bool)][:1]:
            # a dotted key (of a section) and the flag's name; a top-level field's own name is not shown
            # beside its flag when the two differ (the flag is the name a user knows)
            keys = dict.fromkeys(((leaf.key,) if "." in leaf.key else ()) + (self.flags[leaf.key][2:],))
            example = " (e.g. " + " or ".join(f"--set {k}={format_value(leaf.default)}" for k in keys) + ")"
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set",
                            help=f"any setting by dotted key or flag name{example}; repeatable, applied last"
                            .replace("%", "%%"))

    def _section_doc(self, section: tuple[str, ...]) -> str | None:
        """The plain-text description of a section (its field's doc in its parent class); for
        the root, the first paragraph of the tree's docstring."""
        if not section:
            first = (self.cls.__doc__ or "").strip().split("\n\n")[0]
            return plain_text(first) or None
        owner = self.cls
        for part in section[:-1]:
            owner = field_types(owner)[part]
        return plain_text(field_docs(owner).get(section[-1], "")) or None

    def flag_values(self, args: argparse.Namespace) -> dict[str, Any]:
        """``{dotted key: typed value}`` of the flags given on the command line."""
        out = {}
        for k, v in vars(args).items():
            if k.startswith(_DEST):
                leaf = resolve_key(self.cls, k[len(_DEST):], self.names)
                out[leaf.key] = self._typed(leaf, v, self.flag(leaf))
        return out

    @staticmethod
    def _typed(leaf: Leaf, value: Any, option: str) -> Any:
        """``value`` converted by ``leaf``'s annotation; an error names ``option``."""
        try:
            return coerce(leaf.owner.__name__, leaf.name, leaf.type, value)
        except ConfigError as e:
            raise ConfigError(f"{option}: {e}", owner=option, field=e.field, value=e.value,
                              allowed=e.allowed) from None

    def file_values(self, data: Mapping[str, Any], extra: Iterable[str] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split a config file's mapping into ``({dotted key: value}, {extra key: value})``:
        keys in ``extra`` are the command's own settings (``method``, ``seed``...)."""
        extra = set(extra)
        own = {k: v for k, v in data.items() if k in extra}
        rest = {k: v for k, v in data.items() if k not in extra}
        out = {}
        for key, value in flatten_mapping(self.cls, rest):
            leaf = self._resolve(key, "--config")
            out[leaf.key] = self._typed(leaf, value, "--config")
        return out, own

    def _resolve(self, key: str, option: str) -> Leaf:
        try:
            return resolve_key(self.cls, key, self.names)
        except ConfigError as e:
            raise ConfigError(f"{option}: {e}", owner=option, field=key, value=key, allowed=e.allowed) from None

    def set_values(self, items: Iterable[str]) -> dict[str, Any]:
        """``{dotted key: typed value}`` of ``--set KEY=VALUE`` items."""
        out = {}
        for k, v in parse_assignments(items):
            leaf = self._resolve(k, "--set")
            out[leaf.key] = self._typed(leaf, v, "--set")
        return out

    def build(self, base: Any, *layers: Mapping[str, Any]) -> Any:
        """``base`` (an instance of :attr:`cls`: defaults and method preset) with the layers
        applied in order (later wins), validated once as a whole."""
        merged: dict[str, Any] = {}
        for layer in layers:
            for key, value in layer.items():
                merged[resolve_key(self.cls, key, self.names).key] = value
        return apply_overrides(base, merged, self.names)

    def resolve(self, args: argparse.Namespace, base: Any, extra: Iterable[str] = ()) -> tuple[Any, dict[str, Any]]:
        """``(settings, own)``: ``base`` with the ``--config`` file, the flags and ``--set``
        applied (:meth:`build`), and the file's keys in ``extra`` (the command's own settings)."""
        file_layer: dict[str, Any] = {}
        own: dict[str, Any] = {}
        if getattr(args, "config", None) is not None:
            file_layer, own = self.file_values(load_config_file(args.config), extra=extra)
        return self.build(base, file_layer, self.flag_values(args), self.set_values(getattr(args, "set", []))), own

    def resolve_named(self, args: argparse.Namespace, base: Any) -> Any:
        """:meth:`resolve`'s settings; a :class:`ConfigError` is raised again with its flag
        in front (``--seeds: SimStudyOptions.seeds = 0 is invalid: ...``, :meth:`named`)."""
        try:
            return self.resolve(args, base)[0]
        except ConfigError as e:
            raise self.named(e) from None

    def named(self, error: ConfigError) -> ConfigError:
        """``error`` with the flag it is about in front of its message (unless already there)."""
        option = self.option_of(error)
        if option is None or str(error).startswith(option):
            return error
        return ConfigError(f"{option}: {error}", owner=option, field=error.field, value=error.value,
                           allowed=error.allowed)

    def option_of(self, error: ConfigError) -> str | None:
        """The flag (or ``--set``/``--config``) a :class:`ConfigError` is about, if any."""
        if error.owner in ("--set", "--config"):
            return error.owner
        for leaf in leaves(self.cls):
            if leaf.owner.__name__ == error.owner and leaf.name == error.field:
                return self.flag(leaf)
        return None
