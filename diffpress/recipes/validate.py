"""Build config dataclasses from parsed YAML, checked against their fields: one source of truth for the schema.

Every error names the source (a file, or the ``--set`` that caused it), the key path and what is allowed:

>>> from diffpress.compress import QuantizeConfig
>>> q = build(QuantizeConfig, {"weights": "int4", "reconstruct": {"iters": 10}}, Where("r.yaml", ("passes", 0)))
>>> q.weights, q.reconstruct.iters
('int4', 10)
>>> build(QuantizeConfig, {"weghts": "int4"}, Where("r.yaml", ("passes", 0)))
Traceback (most recent call last):
...
diffpress.recipes.validate.RecipeError: r.yaml: passes.0.weghts: unknown key (did you mean 'weights'?); allowed: weights, group_size, ...
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

from diffpress.errors import DiffpressError

_FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class RecipeError(DiffpressError):
    """A recipe problem at ``key`` (a dotted path) of ``source`` (a file, or the ``--set`` that caused it)."""

    def __init__(self, source: str, key: str, message: str):
        self.source, self.key, self.message = source, key, message
        super().__init__(f"{source}: {key + ': ' if key else ''}{message}")


@dataclass(frozen=True)
class Where:
    """A place in a recipe: the source it came from and the key path inside it."""

    source: str
    path: tuple[str | int, ...] = ()

    def __truediv__(self, key: str | int) -> "Where":
        return Where(self.source, (*self.path, key))

    @property
    def key(self) -> str:
        return ".".join(str(p) for p in self.path)

    def error(self, message: str) -> RecipeError:
        return RecipeError(self.source, self.key, message)


def type_name(tp: Any) -> str:
    """How a type reads in an error message: ``int``, ``int or null``, ``list of str``, ``section``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is tuple:
        if args and args[-1] is not Ellipsis:
            return "[" + ", ".join(type_name(a) for a in args) + "]"
        return "list"
    if dataclasses.is_dataclass(tp):
        if hasattr(tp, "from_recipe"):  # a pass entry: its keys depend on the pass it names
            return "a section (a mapping with key 'pass' and that pass's config fields)"
        return f"a section (a mapping with keys {', '.join(fields_of(tp))})"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def show_value(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def _accepts(tp: Any, value: Any) -> bool:
    """Whether ``value`` has the outer shape of ``tp`` (what is inside is checked by :func:`convert`)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, value) for a in typing.get_args(tp))
    if hasattr(tp, "from_recipe") or dataclasses.is_dataclass(tp) or origin is dict:
        return isinstance(value, dict)
    if origin is list:
        return isinstance(value, list)
    if origin is tuple:
        return isinstance(value, (list, tuple))
    if tp is type(None):
        return value is None
    if isinstance(value, bool):
        return tp is bool
    if tp is float:
        return isinstance(value, (int, float))
    return isinstance(tp, type) and isinstance(value, tp)


def _mismatch(tp: Any, value: Any, where: Where) -> RecipeError:
    hint = ""
    if isinstance(value, str) and _FLOAT_TEXT.match(value) and _accepts(tp, 1.0):
        hint = f" (YAML reads {value} as text; write it with a decimal point, e.g. {float(value)!r})"
    return where.error(f"expected {type_name(tp)}, got {show_value(value)}{hint}")


def convert(value: Any, tp: Any, where: Where) -> Any:
    """``value`` checked against the type hint ``tp`` (nested dataclasses are built); raises with ``where``."""
    if not _accepts(tp, value):
        raise _mismatch(tp, value, where)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        return convert(value, next(a for a in args if a is not type(None) and _accepts(a, value)), where)
    if hasattr(tp, "from_recipe"):  # types with their own layout in YAML (pass entries)
        return tp.from_recipe(value, where)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin is list:
        return [convert(v, args[0], where / i) for i, v in enumerate(value)]
    if origin is tuple:
        if args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _mismatch(tp, value, where)
            return tuple(convert(v, k, where / i) for i, (v, k) in enumerate(zip(value, args)))
        return tuple(convert(v, args[0] if args else Any, where / i) for i, v in enumerate(value))
    if tp is float:
        return float(value)
    return value


def fields_of(cls: type) -> dict[str, Any]:
    """Field name -> resolved type hint (the modules use ``from __future__ import annotations``)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def unknown_key(where: Where, key: str, allowed: list[str]) -> RecipeError:
    close = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (where / key).error(f"unknown key{hint}; allowed: {', '.join(allowed)}")


def build(cls: type, data: Any, where: Where, extra_keys: tuple[str, ...] = ()) -> Any:
    """An instance of dataclass ``cls`` from a mapping; unknown keys, wrong types and the dataclass's own
    ``__post_init__`` checks raise :class:`DiffpressError` naming the source and the key path.
    ``extra_keys`` are keys the caller consumed (named among the allowed ones in errors)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise where.error(f"expected {type_name(cls)}, got {show_value(data)}")
    hints = fields_of(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise unknown_key(where, key, [*extra_keys, *hints])
        try:
            kwargs[key] = convert(value, hints[key], where / key)
        except RecipeError as exc:
            allowed = _allowed_values(cls, key) if exc.key == (where / key).key else None
            if allowed is None or "allowed:" in exc.message:
                raise
            raise RecipeError(exc.source, exc.key, f"{exc.message}; allowed: {allowed}") from None
    try:
        return cls(**kwargs)
    except DiffpressError as exc:
        raise _located(str(exc), where, list(hints)) from None


def _allowed_values(cls: type, key: str) -> str | None:
    """The values the dataclass's own check allows for a text field, probed with a value no check accepts
    (the dataclass stays the one place that knows them)."""
    if not _accepts(fields_of(cls)[key], "\0"):
        return None
    try:
        cls(**{key: "\0"})
    except DiffpressError as exc:
        text = str(exc)  # only a message about the probe itself names the field's values
        return text.rpartition("allowed: ")[2] if repr("\0") in text and "allowed: " in text else None
    except Exception:  # noqa: BLE001 - a check that cannot take text at all names no values
        return None
    return None


def _located(message: str, where: Where, keys: list[str]) -> RecipeError:
    """Prefix a dataclass's own message ("key: ...") with the source and the full key path."""
    head, sep, rest = message.partition(": ")
    parts = head.split(".")
    if sep and where.path and parts[0] == str(where.path[-1]) and len(parts) > 1:
        parts = parts[1:]  # the dataclass already named itself (e.g. "reconstruct.iters")
    if sep and parts[0] in keys and " " not in head:
        return Where(where.source, (*where.path, *parts)).error(rest)
    return where.error(message)


def to_data(obj: Any) -> Any:
    """The YAML-ready form of a config: dataclasses as mappings in field order, tuples as lists."""
    if hasattr(obj, "to_recipe"):
        return obj.to_recipe()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {name: to_data(getattr(obj, name)) for name in fields_of(type(obj))}
    if isinstance(obj, (list, tuple)):
        return [to_data(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_data(v) for k, v in obj.items()}
    return obj


# a recipe is a few dozen values: these bounds are far above any real one and far below what hurts
MAX_YAML_BYTES = 1_000_000
MAX_YAML_NODES = 50_000  # scalars, lists and mappings after aliases are expanded
MAX_YAML_DEPTH = 32


def load_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` with bounds: size, nesting depth and the size after aliases are expanded (a few lines
    of nested anchors can stand for billions of values); recursive aliases are refused.

    >>> load_yaml("a: &x [1, 2]\\nb: *x", "r.yaml")
    {'a': [1, 2], 'b': [1, 2]}
    >>> bomb = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\\n" + "".join(
    ...     f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\\n" for i in range(8))
    >>> load_yaml(bomb, "bomb.yaml")
    Traceback (most recent call last):
    ...
    diffpress.errors.DiffpressError: bomb.yaml: the YAML expands to more than 50000 values (through its aliases); a recipe needs a few dozen
    """
    import yaml

    if len(text) > MAX_YAML_BYTES:
        raise DiffpressError(f"{source}: {len(text):,} characters; a recipe is far smaller (limit {MAX_YAML_BYTES:,})")
    _check_nesting(text, source)  # event by event: composing a deep document would recurse first
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node, source)
        return loader.construct_document(node)
    except RecursionError:
        raise DiffpressError(f"{source}: the YAML nests too deeply; a recipe needs a few levels") from None
    finally:
        loader.dispose()


def _check_nesting(text: str, source: str) -> None:
    """Nesting depth from the parser's event stream (iterative, so any depth is safe to measure)."""
    import yaml

    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise DiffpressError(f"{source}: the YAML nests deeper than {MAX_YAML_DEPTH} levels; a recipe needs "
                                     "a few")
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1


def _check_size(root: Any, source: str) -> None:
    """Expanded node count and depth of a composed YAML node graph (shared nodes counted per use), memoized."""
    import yaml

    sizes: dict[int, tuple[int, int]] = {}  # id -> (expanded nodes, depth)
    active: set[int] = set()

    def visit(node: Any) -> tuple[int, int]:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise DiffpressError(f"{source}: a recursive alias (an anchor used inside itself); recipes cannot hold one")
        active.add(key)
        children: list = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        count, depth = 1, 0
        for child in children:
            c, d = visit(child)
            count, depth = count + c, max(depth, d)
            if count > MAX_YAML_NODES:
                raise DiffpressError(f"{source}: the YAML expands to more than {MAX_YAML_NODES} values (through its "
                                     "aliases); a recipe needs a few dozen")
        if depth + 1 > MAX_YAML_DEPTH:
            raise DiffpressError(f"{source}: the YAML nests deeper than {MAX_YAML_DEPTH} levels; a recipe needs a few")
        active.discard(key)
        sizes[key] = (count, depth + 1)
        return sizes[key]

    visit(root)
