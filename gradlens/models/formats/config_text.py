"""A checkpoint's config text (mmcv's and mmengine's ``Config.pretty_text``) read as data, never run.

mmdetection stores the config a model was trained with as Python source in the checkpoint's ``meta``
(``config`` in 2.x, ``cfg`` in 3.x), and that text says how the model is tested (scale, padding,
normalisation) and, for other families, much more. A checkpoint is a file anyone can send, so the text
is parsed with :mod:`ast` and only these forms are understood, everything else is kept as an
:class:`Opaque` value holding its source:

- literals: numbers, strings, ``True``/``False``/``None``, lists, tuples, sets, ``{...}`` dicts with
  literal keys, a sign before a number;
- ``dict(key=value, ...)`` (with ``**name`` of a dict assigned earlier), ``list(...)``/``tuple(...)`` of
  one literal sequence;
- a name assigned earlier in the text (``pipeline=test_pipeline``).

Top-level statements other than ``name = value`` (imports, function definitions, bare expressions) are
ignored. A value that a reader needs and finds :class:`Opaque` is refused by that reader in one sentence
naming the setting as written. Text that is not Python at all is refused in one sentence.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

from gradlens.errors import CheckpointError

MAX_TEXT = 4_000_000  # characters: mmdetection's longest configs are ~20,000


@dataclass(frozen=True)
class Opaque:
    """A value the reader does not evaluate (an expression, a call, a comprehension): its source text."""

    source: str


class ConfigDict(dict):
    """A dict read from config text that remembers how each value was written (``sources[key]``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sources: dict = {}


def read_config(text: str) -> ConfigDict:
    """The top-level names of ``text`` and their values, in the order they are assigned (see the module)."""
    if not isinstance(text, str):
        raise CheckpointError("The checkpoint's config is not text.")
    if len(text) > MAX_TEXT:
        raise CheckpointError(f"The checkpoint's config text is {len(text):,} characters long; gradlens reads at most "
                              f"{MAX_TEXT:,}.")
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        line = f" (line {exc.lineno})" if isinstance(exc, SyntaxError) and exc.lineno else ""
        raise CheckpointError(f"The checkpoint's config text is not Python{line}, so gradlens cannot read it as data "
                              "(it never runs it).") from None
    names = ConfigDict()
    reader = _Reader(text, names)
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            try:
                names[name] = reader.value(node.value)
            except RecursionError:
                names[name] = Opaque(reader.source(node.value))
            names.sources[name] = reader.source(node.value)
    return names


class _Reader:
    def __init__(self, text: str, names: ConfigDict):
        self.text, self.names = text, names

    def source(self, node) -> str:
        return ast.get_source_segment(self.text, node) or ""

    def value(self, node):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)) \
                and isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, (int, float)) \
                and not isinstance(node.operand.value, bool):
            return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            items = [self.value(e) for e in node.elts]
            if any(isinstance(v, Opaque) for v in items) or any(isinstance(e, ast.Starred) for e in node.elts):
                return Opaque(self.source(node))  # a sequence with an expression in it is no data
            return items if isinstance(node, ast.List) else tuple(items) if isinstance(node, ast.Tuple) else set(items)
        if isinstance(node, ast.Dict):
            out = ConfigDict()
            for k, v in zip(node.keys, node.values):
                key = None if k is None else self.value(k)
                if k is None or isinstance(key, (Opaque, list, dict, set)):
                    return Opaque(self.source(node))
                out[key] = self.value(v)
                out.sources[key] = self.source(v)
            return out
        if isinstance(node, ast.Name):
            if node.id in self.names:
                return self.names[node.id]
            return Opaque(node.id)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "dict" and not node.args:
                out = ConfigDict()
                for keyword in node.keywords:
                    if keyword.arg is None:  # **name: a dict assigned earlier, merged in order
                        merged = self.value(keyword.value)
                        if not isinstance(merged, dict):
                            return Opaque(self.source(node))
                        out.update(merged)
                        out.sources.update(getattr(merged, "sources", {}))
                        continue
                    out[keyword.arg] = self.value(keyword.value)
                    out.sources[keyword.arg] = self.source(keyword.value)
                return out
            if node.func.id in ("list", "tuple") and len(node.args) == 1 and not node.keywords:
                inner = self.value(node.args[0])
                if isinstance(inner, (list, tuple)):
                    return list(inner) if node.func.id == "list" else tuple(inner)
        return Opaque(self.source(node))


def settings(value, key: str):
    """Every ``(value, written, owner)`` for ``key`` anywhere inside ``value`` (dicts and sequences, depth first,
    in the order written): a setting wherever the config nests it."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == key:
                    found.append((v, getattr(node, "sources", {}).get(k, repr(v)), node))
                walk(v)
        elif isinstance(node, (list, tuple)):
            for item in node:
                walk(item)

    walk(value)
    return found
