"""Command-line options generated from config dataclasses, and the layering of their sources.

Every command that runs something (``sim run``, ``sim compare``, ``llm train``, ``llm sft``,
``llm eval``) declares its settings once, as a dataclass tree (:class:`OptionSet`); its flags,
their help (from the dataclasses' docstrings) and their defaults (from the fields) are
generated, and every field can be set. The sources are layered the same way everywhere:

    defaults < method preset < ``--config FILE`` (JSON or YAML) < explicit flags < ``--set KEY=VALUE``

and every value goes through :mod:`deepgrpo.overrides` (typed by the field's annotation).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepgrpo.config import ConfigError
from deepgrpo.overrides import (
    Leaf,
    apply_overrides,
    coerce,
    flatten_mapping,
    leaves,
    parse_assignments,
    resolve_key,
    short_names,
    type_name,
)

_DEST = "cfg:"


class UsageError(ConfigError):
    """A command-line argument error: a :class:`ConfigError`, so ``deepgrpo`` prints it as one
    line ``deepgrpo CMD: error: ...`` and exits 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit code 2 (raised as :class:`UsageError`)
    instead of a usage block; ``--help`` is unchanged. Every command's parser is one."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Raise :class:`UsageError` with ``message`` (argparse would print its usage and exit)."""
        raise UsageError(message)


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
    reserved: names the command uses for its own (non-config) arguments (``out``, ``seed``...):
        a field with such a short name gets a longer, prefixed flag (``--spec-seed``).
    hidden: dotted keys that get no flag (still settable by ``--set`` and ``--config``).
    """

    cls: type
    reserved: Iterable[str] = ()
    hidden: Iterable[str] = ()
    names: dict[str, Leaf] = field(init=False)

    def __post_init__(self) -> None:
        self.reserved = tuple(self.reserved)
        self.hidden = tuple(self.hidden)
        self.names = short_names(leaves(self.cls), self.reserved)

    def flag(self, leaf: Leaf) -> str:
        """The flag of ``leaf`` (``--G``, ``--kl-coef``, ``--spec-seed``)."""
        for name, other in self.names.items():
            if other.key == leaf.key:
                return "--" + name.replace("_", "-")
        return "--set"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add one flag per field (grouped by section), ``--config FILE`` and ``--set KEY=VALUE``."""
        groups: dict[str, Any] = {}
        name_of = {leaf.key: name for name, leaf in self.names.items()}
        for leaf in leaves(self.cls):  # in declaration order
            name = name_of[leaf.key]
            if leaf.key in self.hidden:
                continue
            section = leaf.owner.__name__
            group = groups.get(section) or groups.setdefault(section, parser.add_argument_group(section))
            help_ = f"{leaf.doc} (default: {leaf.default!r})".replace("%", "%%")
            flag = "--" + name.replace("_", "-")
            if leaf.type is bool:
                group.add_argument(flag, dest=_DEST + leaf.key, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=help_)
            else:
                group.add_argument(flag, dest=_DEST + leaf.key, default=argparse.SUPPRESS, help=help_,
                                   metavar=_metavar(leaf))
        parser.add_argument("--config", default=None, metavar="FILE",
                            help="JSON or YAML file of settings (sections as in the run's resolved config, or "
                                 "KEY: VALUE pairs as for --set); flags and --set override it")
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set",
                            help="any setting by dotted key or name (e.g. --set explore.G=16 --set scale_std=on); "
                                 "applied last")

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

    def option_of(self, error: ConfigError) -> str | None:
        """The flag (or ``--set``/``--config``) a :class:`ConfigError` is about, if any."""
        if error.owner in ("--set", "--config"):
            return error.owner
        for name, leaf in self.names.items():
            if leaf.owner.__name__ == error.owner and leaf.name == error.field:
                return "--set" if leaf.key in self.hidden else "--" + name.replace("_", "-")
        return None


def _metavar(leaf: Leaf) -> str:
    name = type_name(leaf.type)
    for word, meta in (("integer", "INT"), ("number", "FLOAT"), ("string", "TEXT"), ("list", "A,B"),
                       ("JSON", "JSON")):
        if word in name:
            return meta + ("|none" if name.endswith("or none") else "")
    return "VALUE"
