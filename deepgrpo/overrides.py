"""One typed override path for every config dataclass of the project.

Every config is a dataclass whose fields carry type annotations (``int``, ``float``, ``bool``,
``str``, ``X | None``, ``tuple[float, float]``, ``dict[str, Any]`` or a nested config dataclass).
Values reach them from four places — Python, a JSON/YAML file, a command-line flag and
``--set KEY=VALUE`` — and all four go through :func:`coerce`, by the field's annotation:

* ``bool``: ``true/false``, ``on/off``, ``yes/no``, ``1/0`` (any case) or a real bool; nothing else;
* ``int``: ``8`` or ``8.0`` (converted to 8); ``8.5``, ``inf`` or a bool are errors;
* ``float``: any finite number (``nan`` and ``inf`` are errors);
* ``X | None``: ``none`` / ``null`` (any case) or ``None`` give None, anything else is an X;
* ``tuple[...]``: ``0.9,0.999`` or a JSON list; ``dict``: a JSON object; a nested dataclass: a
  mapping of its fields.

Keys are dotted paths into nested sections (``explore.G``, ``loss.lam``, ``spec.depth``) or a
field's bare name when exactly one field of the tree is the shallowest one with that name
(``G``, ``lam``). A bad key or value raises :class:`~deepgrpo.config.ConfigError` with the
owner, the field, the value and what is allowed as attributes.
"""

from __future__ import annotations

import dataclasses
import decimal
import functools
import json
import math
import numbers
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Union

from deepgrpo.config import ConfigError, invalid

TRUE_WORDS = ("true", "on", "yes", "1")
"""Text accepted as True by a ``bool`` field."""
FALSE_WORDS = ("false", "off", "no", "0")
"""Text accepted as False by a ``bool`` field."""
NONE_WORDS = ("none", "null")
"""Text accepted as None by an optional field."""


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """``{field name: resolved annotation}`` of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_optional(tp: Any) -> tuple[bool, Any]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return True, rest[0]
    return False, tp


_NOUNS = {bool: ("a boolean (true/false, on/off, yes/no, 1/0)", "booleans"), int: ("an integer", "integers"),
          float: ("a finite number", "finite numbers"), str: ("a string", "strings")}
"""``{type: (singular phrase, plural noun)}`` of the scalar annotations."""


def type_name(tp: Any) -> str:
    """A short human name of annotation ``tp``: ``an integer``, ``a finite number or none``,
    ``2 comma-separated finite numbers (e.g. 0.9,0.999)``."""
    optional, inner = _is_optional(tp)
    if optional:
        return f"{type_name(inner)} or none"
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if not args:
            return "comma-separated values"
        variable = args[-1] is Ellipsis
        kinds = set(args[:-1] if variable else args)
        noun = _NOUNS[next(iter(kinds))][1] if len(kinds) == 1 and next(iter(kinds)) in _NOUNS else "values"
        example = {"finite numbers": "0.9,0.999", "integers": "1,2", "strings": "a,b"}.get(noun)
        count = "" if variable else f"{len(args)} "
        return f"{count}comma-separated {noun}" + (f" (e.g. {example})" if example else "")
    if origin is dict or tp is dict:
        return "a JSON object"
    if dataclasses.is_dataclass(tp):
        return f"a {tp.__name__} mapping"
    return _NOUNS[tp][0] if tp in _NOUNS else getattr(tp, "__name__", str(tp))


def coerce(owner: str, name: str, tp: Any, value: Any) -> Any:
    """``value`` (text or a Python value) converted to annotation ``tp`` of field
    ``owner.name``; raises :class:`ConfigError` naming the field when it cannot be."""
    optional, inner = _is_optional(tp)
    if optional:
        if value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS):
            return None
        return coerce(owner, name, inner, value)
    text = value.strip() if isinstance(value, str) else None
    bad = invalid(owner, name, value, type_name(tp))
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, numbers.Integral) and value in (0, 1):
            return bool(value)
        if text is not None and text.lower() in TRUE_WORDS + FALSE_WORDS:
            return text.lower() in TRUE_WORDS
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, numbers.Integral):
            return int(value)
        if text is not None:  # exact: an integer of any size ("12345678901234567891", "8", "8.0", "1e3")
            try:
                exact = decimal.Decimal(text)
            except decimal.InvalidOperation:
                raise bad from None
            if not exact.is_finite() or exact.adjusted() > 60 or exact != exact.to_integral_value():
                raise bad  # past 60 digits it is no setting (and int() of 1e400000000 would not end)
            return int(exact)
        number = float(value) if isinstance(value, numbers.Real) else None
        if number is None or not math.isfinite(number) or not number.is_integer():
            raise bad
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            raise bad
        number = _number(text) if text is not None else (float(value) if isinstance(value, numbers.Real) else None)
        if number is None or not math.isfinite(number):
            raise bad
        return float(number)
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    origin = typing.get_origin(tp)
    if origin is tuple:
        items = _parse_json(text, bad) if text is not None and text.startswith("[") else (
            [t for t in text.split(",")] if text is not None else value)
        if not isinstance(items, (list, tuple)):
            raise bad
        args = typing.get_args(tp)
        if args and args[-1] is not Ellipsis and len(items) != len(args):
            raise bad
        kinds = [args[0]] * len(items) if args and args[-1] is Ellipsis else list(args or [Any] * len(items))
        return tuple(coerce(owner, name, k, v) for k, v in zip(kinds, items))
    if origin is dict or tp is dict:
        obj = _parse_json(text, bad) if text is not None else value
        if not isinstance(obj, Mapping):
            raise bad
        return dict(obj)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        obj = _parse_json(text, bad) if text is not None else value
        if not isinstance(obj, Mapping):
            raise bad
        return from_dict(tp, obj)
    return value


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _parse_json(text: str, error: ConfigError) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise error from None


def from_dict(cls: type, d: Mapping[str, Any]) -> Any:
    """Build dataclass ``cls`` from a (nested) mapping, strictly: every value goes through
    :func:`coerce`, an unknown key raises :class:`ConfigError` naming it and the known fields."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{cls.__name__} = {d!r} is invalid: expected a mapping of its fields",
                          owner=cls.__name__, value=d, allowed="a mapping")
    types_ = field_types(cls)
    unknown = sorted(set(d) - set(types_))
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {', '.join(map(str, unknown))}; "
                          f"known: {', '.join(sorted(types_))}", owner=cls.__name__, field=str(unknown[0]),
                          value=unknown[0], allowed=f"one of {', '.join(sorted(types_))}")
    kwargs = {k: coerce(cls.__name__, k, types_[k], v) for k, v in d.items()}
    return cls(**kwargs)


def leaf_values(config: Any) -> dict[str, Any]:
    """``{dotted key: value}`` of every leaf of dataclass ``config`` (see :func:`leaves`): what
    two configs are compared by (a method's preset, a resumed run)."""
    out = {}
    for leaf in leaves(type(config)):
        value = config
        for part in leaf.path:
            value = getattr(value, part)
        out[leaf.key] = value
    return out


# ------------------------------------------------------------------------------------------
# keys: dotted paths and bare names


@dataclass(frozen=True)
class Leaf:
    """One settable field of a config tree.

    path: field names from the root (``("explore", "G")``); owner: the dataclass that declares
    the field; name: the field's name; type: its annotation; default: its default value;
    doc: its description from the owner's docstring; required: the field has no default (its
    ``default`` is then None).
    """

    path: tuple[str, ...]
    owner: type
    name: str
    type: Any
    default: Any
    doc: str
    required: bool = False

    @property
    def key(self) -> str:
        """The dotted path (``explore.G``)."""
        return ".".join(self.path)


def leaves(cls: type, prefix: tuple[str, ...] = ()) -> list[Leaf]:
    """Every settable field of dataclass ``cls``, nested sections expanded (depth-first)."""
    out: list[Leaf] = []
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = field_types(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out += leaves(tp, prefix + (f.name,))
        else:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            out.append(Leaf(prefix + (f.name,), cls, f.name, tp, default, docs.get(f.name, ""), required))
    return out


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: description}`` read from the class docstring's ``name: text`` (or
    ``a, b: text``) lines, the style of every config dataclass of the project."""
    out: dict[str, str] = {}
    current: list[str] = []
    text: list[str] = []
    indent = None
    for line in (cls.__doc__ or "").splitlines():
        m = re.match(r"^(\s*)(\w+(?:,\s*\w+)*):\s+(\S.*)$", line)
        if m and (indent is None or len(m.group(1)) <= indent + 4):
            names = [n.strip() for n in m.group(2).split(",")]
            if all(n in {f.name for f in dataclasses.fields(cls)} for n in names):
                for n in current:
                    out[n] = " ".join(text)
                current, text, indent = names, [m.group(3).strip()], len(m.group(1))
                continue
        if current and line.strip() and indent is not None and len(line) - len(line.lstrip()) > indent:
            text.append(line.strip())
        elif current:
            for n in current:
                out[n] = " ".join(text)
            current, text = [], []
    for n in current:
        out[n] = " ".join(text)
    return out


def short_names(all_leaves: Iterable[Leaf], reserved: Iterable[str] = ()) -> dict[str, Leaf]:
    """``{name: leaf}``: each leaf's shortest unambiguous name.

    A leaf is named by the shortest tail of its path (joined by ``_``) such that it is the one
    shallowest leaf with that tail; names in ``reserved`` are skipped. With the sections
    ``train`` and ``train.eval`` both holding ``seed``, ``seed`` names ``train.seed`` and
    ``eval_seed`` names ``train.eval.seed``; ``sampling_temperature`` and ``eval_temperature``
    when neither ``temperature`` is shallower.
    """
    pool = list(all_leaves)
    taken = set(reserved)
    out: dict[str, Leaf] = {}
    for n in range(1, max((len(leaf.path) for leaf in pool), default=0) + 1):
        tails: dict[str, list[Leaf]] = {}
        for leaf in pool:
            if len(leaf.path) >= n:
                tails.setdefault("_".join(leaf.path[-n:]), []).append(leaf)
        for name, group in tails.items():
            if name in taken:
                continue
            open_ = [leaf for leaf in group if leaf not in out.values()]
            if not open_:
                continue
            depth = min(len(leaf.path) for leaf in group)
            shallow = [leaf for leaf in group if len(leaf.path) == depth]
            if len(shallow) == 1 and shallow[0] in open_:
                out[name] = shallow[0]
                taken.add(name)
    missing = [leaf for leaf in pool if leaf not in out.values()]
    for leaf in missing:  # only reserved names stood in the way: use the full path
        out["_".join(leaf.path)] = leaf
    return out


def resolve_key(cls: type, key: str, names: Mapping[str, Leaf] | None = None) -> Leaf:
    """The leaf of dataclass tree ``cls`` that ``key`` means: a dotted path (full, or a tail
    that only one leaf ends with) or a short name (:func:`short_names`)."""
    all_leaves = leaves(cls)
    names = short_names(all_leaves) if names is None else names
    k = key.strip()
    flat = k.replace("-", "_")
    if flat in names:
        return names[flat]
    parts = tuple(p.replace("-", "_") for p in k.split("."))
    exact = [leaf for leaf in all_leaves if leaf.path == parts]
    tail = exact or [leaf for leaf in all_leaves if leaf.path[-len(parts):] == parts]
    if len(tail) == 1:
        return tail[0]
    if len(tail) > 1:
        raise ConfigError(f"{key} is ambiguous: it may mean {', '.join(leaf.key for leaf in tail)}",
                          owner=cls.__name__, field=key, value=key,
                          allowed="one of " + ", ".join(leaf.key for leaf in tail))
    raise ConfigError(f"{key} is not a setting of {cls.__name__}; known: {', '.join(sorted(names))}",
                      owner=cls.__name__, field=key, value=key, allowed="a known setting")


def apply_overrides(config: Any, overrides: Mapping[str, Any],
                    names: Mapping[str, Leaf] | None = None) -> Any:
    """A copy of dataclass ``config`` with ``{key: value}`` applied (keys as in
    :func:`resolve_key`, values as in :func:`coerce`); the result is validated as a whole, so
    fields that constrain each other may be set together in any order."""
    cls = type(config)
    tree = dataclasses.asdict(config)
    for key, value in overrides.items():
        leaf = resolve_key(cls, key, names)
        node = tree
        for part in leaf.path[:-1]:
            node = node[part]
        node[leaf.path[-1]] = coerce(leaf.owner.__name__, leaf.name, leaf.type, value)
    return from_dict(cls, tree)


def parse_assignments(items: Iterable[str], option: str = "--set") -> list[tuple[str, str]]:
    """``["a=1", "b.c=x"]`` -> ``[("a", "1"), ("b.c", "x")]``; a malformed item raises
    :class:`ConfigError` naming ``option``."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} {item!r} is invalid: expected KEY=VALUE (e.g. gamma=1.0)",
                              owner=option, value=item, allowed="KEY=VALUE")
        out.append((key.strip(), value.strip()))
    return out


def flatten_mapping(cls: type, d: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    """``(dotted key, value)`` pairs of a nested mapping laid out like dataclass tree ``cls``
    (a config file). Sections recurse; other keys are kept as given (they may be short names)."""
    out: list[tuple[str, Any]] = []
    types_ = field_types(cls)
    for k, v in d.items():
        tp = types_.get(k)
        if tp is not None and dataclasses.is_dataclass(tp) and isinstance(v, Mapping):
            out += flatten_mapping(tp, v, prefix + (k,))
        else:
            out.append((".".join(prefix + (str(k),)), v))
    return out
