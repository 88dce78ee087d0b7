"""Reading config text that may be hostile: every way it can go wrong is a :class:`~lightning_stages.StageConfigError`
naming the file (and the line where there is one), never a raw exception.

* the file is read as UTF-8, at most 256 MiB of it (:mod:`.config_files`; a binary file is named as such);
* JSON is read by ``json.loads`` (plain JSON at C speed) and, for JSON with comments, ``json5``; YAML by a safe loader;
* a key given twice in one mapping is an error naming the key and both lines (JSON and YAML would keep the last);
* a number with more digits than Python converts, nesting deeper than :data:`MAX_DEPTH`, a YAML value that refers
  to itself, or YAML aliases that expand to more than :data:`MAX_VALUES` values are refused.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any, Optional

import json5
import yaml

from lightning_stages.errors import StageConfigError, StageProblem, printable, short_repr
from lightning_stages.schedule.config_files import MAX_BYTES, read_text  # re-exported: read from here too

__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_VALUES", "check_shape", "parse_json", "parse_yaml", "read_text"]

#: the deepest nesting of mappings and lists a config may have
MAX_DEPTH = 100
#: the most values a YAML config may expand to through its aliases (each alias counts what it repeats)
MAX_VALUES = 10_000_000
# json5's message: "<string>:LINE Unexpected "x" at column COL" (or without a column at the end of the text)
_JSON5_WHERE = re.compile(r"^<string>:(?P<line>\d+)\s*(?P<msg>.*?)(?: at column (?P<col>\d+))?$", re.DOTALL)


def _error(message: str) -> StageConfigError:
    return StageConfigError(StageProblem(message))


class _DuplicateKey(Exception):
    def __init__(self, key: Any, lines: tuple[Optional[int], Optional[int]] = (None, None),
                 columns: Optional[tuple[int, int]] = None, alias: bool = False) -> None:
        super().__init__(key)
        self.key, self.lines, self.columns, self.alias = key, lines, columns, alias


def _unique(pairs: Iterable[tuple[Any, Any]]) -> dict[Any, Any]:
    """``object_pairs_hook`` that refuses a key given twice (``dict(pairs)`` at C speed; the key sought only then)."""
    pairs = pairs if isinstance(pairs, list) else list(pairs)
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[Any] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return data


def _duplicate_message(source: str, key: Any, lines: tuple[Optional[int], Optional[int]],
                       columns: Optional[tuple[int, int]] = None, alias: bool = False) -> str:
    where = f" (lines {lines[0]} and {lines[1]})" if None not in lines else ""
    if columns is not None and lines[0] == lines[1]:
        where = f" (line {lines[0]}, columns {columns[0]} and {columns[1]})"
    if alias and columns is not None and lines[0] == lines[1] and columns[0] == columns[1]:
        where = f" (line {lines[0]}, column {columns[0]}, and again through an alias of it)"
    elif alias:  # PyYAML keeps no place for an alias: the anchor's stands for it
        where = f" (lines {lines[0]} and {lines[1]}, one of them an alias: the line of its anchor)"
    return (f"{source}: the key {short_repr(key)} is given twice in one mapping{where}; a parser would silently keep "
            "the last: give it once")


def _json_key_lines(text: str, key: Any) -> tuple[Optional[int], Optional[int]]:
    """The lines of the first two occurrences of ``key`` in one object of JSON (with comments) ``text``; only run
    once a duplicate is known, so a plain character loop is fast enough."""
    stack: list[Optional[dict[Any, int]]] = []  # the keys (and their line) of each open object; None for a list
    token: Optional[tuple[Any, int]] = None  # the last string or bare word, and its line: a key if ':' follows
    i, line, n = 0, 1, len(text)
    while i < n:
        c = text[i]
        if c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            raw = text[i:j + 1]
            try:  # json5 decodes what JSON with comments allows in a string (single quotes, \x41 escapes)
                token = (json.loads(raw) if c == '"' else json5.loads(raw), line)
            except ValueError:
                token = (raw[1:-1], line)
            line += raw.count("\n")
            i = j + 1
            continue
        if text.startswith("//", i) or text.startswith("/*", i):
            end = text.find("\n" if c == "/" and text[i + 1] == "/" else "*/", i + 2)
            end = n if end < 0 else end
            line += text.count("\n", i, end)
            i = end
            continue
        if c == "\n":
            line += 1
        elif c == "{":
            stack.append({})
        elif c == "[":
            stack.append(None)
        elif c in "}]" and stack:
            stack.pop()
        elif c == ":" and stack and stack[-1] is not None and token is not None:
            seen = stack[-1]
            if token[0] in seen and token[0] == key:
                return seen[token[0]], token[1]
            seen.setdefault(token[0], token[1])
        elif c.isalnum() or c in "_$":
            j = i
            while j < n and (text[j].isalnum() or text[j] in "_$"):
                j += 1
            token = (text[i:j], line)
            i = j
            continue
        if c in ",{}[]":
            token = None
        i += 1
    return None, None


def _long_number_line(text: str) -> Optional[int]:
    limit = sys.get_int_max_str_digits()
    match = re.search(rf"\d{{{limit + 1},}}", text) if limit else None
    return text.count("\n", 0, match.start()) + 1 if match else None


def _number_too_long(source: str, text: str) -> StageConfigError:
    line = _long_number_line(text)
    where = f"{source}:{line}" if line is not None else source
    return _error(f"{where}: a number has more than {sys.get_int_max_str_digits()} digits (more than Python reads)")


def parse_json(text: str, source: str = "<string>") -> Any:
    """Parse JSON, with ``//`` and ``/* */`` comments allowed: ``json.loads`` first (plain JSON at C speed),
    the ``json5`` parser for the rest. A key given twice in one object is an error.

    Raises:
        StageConfigError: naming ``source``, line and column, if the text is neither JSON nor JSON with comments,
            gives a key twice, nests too deeply or has a number too long to read.

    Example::

        >>> parse_json('{"a": 1, // one\\n "b": "x//y" /* two */}')
        {'a': 1, 'b': 'x//y'}
        >>> parse_json('{"a": 1,\\n "b": }', "c.json")
        Traceback (most recent call last):
        ...
        lightning_stages.errors.StageConfigError: 1 problem in the stage schedule:
          - schedule: c.json:2:7: not valid JSON: Unexpected "}"
        >>> parse_json('{"a": 1,\\n "a": 2}', "c.json")
        Traceback (most recent call last):
        ...
        lightning_stages.errors.StageConfigError: 1 problem in the stage schedule:
          - schedule: c.json: the key 'a' is given twice in one mapping (lines 1 and 2); a parser would silently keep the last: give it once
    """
    try:
        try:
            return json.loads(text, object_pairs_hook=_unique)
        except json.JSONDecodeError as plain_error:
            try:
                return json5.loads(text, object_pairs_hook=_unique)
            except (_DuplicateKey, RecursionError, MemoryError):
                raise
            except ValueError as err:
                if "digits" in str(err) and _long_number_line(text) is not None:  # json5's int() of a long number
                    raise _number_too_long(source, text) from None
                match = _JSON5_WHERE.match(str(err))
                if match is None:  # not a syntax error json5 locates: json's own message has line and column
                    line, col, msg = plain_error.lineno, plain_error.colno, plain_error.msg
                else:
                    line, msg = int(match["line"]), match["msg"].strip()
                    col = int(match["col"]) if match["col"] else 1
                raise _error(f"{source}:{line}:{col}: not valid JSON: {msg}") from None
    except StageConfigError:
        raise
    except _DuplicateKey as duplicate:
        raise _error(_duplicate_message(source, duplicate.key, _json_key_lines(text, duplicate.key))) from None
    except RecursionError:
        raise _error(f"{source}: nested too deeply to read (a config nests at most {MAX_DEPTH} levels)") from None
    except MemoryError:
        raise _error(f"{source}: too large to read into memory") from None
    except ValueError as err:  # json.loads: an integer longer than sys.get_int_max_str_digits()
        if "digits" in str(err):
            raise _number_too_long(source, text) from None
        raise _error(f"{source}: not valid JSON: {short_repr(str(err))}") from None


class _MergeKey:
    """The merge key ``<<`` among a mapping's keys (a key of its own: not the string ``"<<"``)."""

    def __repr__(self) -> str:
        return "'<<'"


_MERGE = _MergeKey()


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (merge keys ``<<`` may still be overridden)."""

    def flatten_mapping(self, node: Any) -> None:
        # PyYAML calls this for every mapping before building it, and for each mapping it merges (before building
        # that one): it then replaces the merge keys with the merged pairs, in place. So each mapping's own keys are
        # checked here, once, as written (a chain `mid: {<<: *base, a: 2}`, `stage: {<<: *mid}` is no duplicate)
        checked: set[int] = self.__dict__.setdefault("_checked", set())
        if id(node) not in checked:
            checked.add(id(node))
            self._check_keys(node)
        super().flatten_mapping(node)

    def _check_keys(self, node: Any) -> None:
        seen: dict[Any, tuple[int, int]] = {}  # each key's line and column (a flow mapping is on one line)
        for key_node, _ in node.value:
            where = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            # a merge key once (`<<: [*a, *b]` merges several); an explicit key may override what it merges
            key = _MERGE if key_node.tag == "tag:yaml.org,2002:merge" else self.construct_object(key_node)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the constructor names it
                continue
            if first is not None:  # an alias of a key stands where its anchor is: outside this mapping, or the same
                alias = first == where or not node.start_mark.index <= key_node.start_mark.index <= node.end_mark.index
                raise _DuplicateKey(key, (first[0], where[0]), (first[1], where[1]), alias=alias)
            seen[key] = where

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        """PyYAML's, with a value its tag cannot read (``!!timestamp foo``, ``!!bool maybe``, ``!!int ''``) a YAML
        error at its line: PyYAML's constructors raise ``AttributeError``, ``KeyError`` or ``IndexError`` there."""
        try:
            return super().construct_object(node, deep)
        except (AttributeError, KeyError, IndexError, TypeError):
            tag = str(node.tag).replace("tag:yaml.org,2002:", "!!")
            value = short_repr(node.value) if isinstance(node, yaml.ScalarNode) else "the value"
            raise yaml.constructor.ConstructorError(None, None, f"cannot read {value} as {printable(tag)}",
                                                    node.start_mark) from None


def _read_as_jsonargparse_does(loader: type[yaml.SafeLoader]) -> None:
    """Give ``loader`` the implicit types of jsonargparse's YAML loader, which LightningCLI reads configs with: a
    date (``name: 2024-01-01``) stays a string, and a number with an exponent but no dot (``1e-3``) is a float (YAML
    1.1 reads the first as a date and the second as a string)."""
    loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers
                if tag not in ("tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:float")]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"""^(?:
        [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


_read_as_jsonargparse_does(_UniqueKeyLoader)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML with the safe loader; a key given twice in one mapping is an error, and so is a value that refers to
    itself, too deep or, through aliases, too large (:func:`check_shape`).

    Raises:
        StageConfigError: naming ``source`` (and the line, where the YAML has one).

    Example::

        >>> parse_yaml("a: 1\\nb: {c: 2}")
        {'a': 1, 'b': {'c': 2}}
        >>> parse_yaml("stage_schedule:\\n  - start_epoch: 0\\n    distillation: true\\n    distillation: false", "s.yaml")
        Traceback (most recent call last):
        ...
        lightning_stages.errors.StageConfigError: 1 problem in the stage schedule:
          - schedule: s.yaml: the key 'distillation' is given twice in one mapping (lines 3 and 4); a parser would silently keep the last: give it once
    """
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except _DuplicateKey as duplicate:
        raise _error(_duplicate_message(source, duplicate.key, duplicate.lines, duplicate.columns,
                                        duplicate.alias)) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        reason = getattr(err, "problem", None) or str(err).splitlines()[0]
        context, first = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and getattr(err, "problem", None):  # "found duplicate anchor 'x'; first occurrence": say what
            reason = f"{context}{f' (line {first.line + 1})' if first is not None else ''}, {reason}"
        raise _error(f"{where}: not valid YAML: {reason}") from None
    except RecursionError:
        raise _error(f"{source}: nested too deeply to read (a config nests at most {MAX_DEPTH} levels)") from None
    except MemoryError:
        raise _error(f"{source}: too large to read into memory") from None
    except ValueError as err:  # an integer longer than sys.get_int_max_str_digits()
        if "digits" in str(err):
            raise _number_too_long(source, text) from None
        raise _error(f"{source}: not valid YAML: {short_repr(str(err))}") from None
    check_shape(data, source)
    return data


def check_shape(value: Any, source: str = "<string>") -> None:
    """Refuse a value that refers to itself, nests deeper than :data:`MAX_DEPTH` or expands to more than
    :data:`MAX_VALUES` values (counting what each shared part repeats): one pass over its distinct parts, no recursion.

    Raises:
        StageConfigError: naming ``source``.

    Example::

        >>> bomb = ["x"] * 10
        >>> for _ in range(8):
        ...     bomb = [bomb] * 10
        >>> check_shape({"stage_schedule": [{"name": bomb}]}, "b.yaml")
        Traceback (most recent call last):
        ...
        lightning_stages.errors.StageConfigError: 1 problem in the stage schedule:
          - schedule: b.yaml: expands to more than 10000000 values through repeated aliases; write the values out
    """
    if not isinstance(value, (Mapping, list, tuple)):
        return
    sizes: dict[int, tuple[int, int]] = {}  # id -> (values it expands to, its depth)
    open_ids: set[int] = set()
    stack: list[tuple[Any, bool]] = [(value, False)]
    while stack:
        item, done = stack.pop()
        children: Iterable[Any] = item.values() if isinstance(item, Mapping) else item
        if done:
            open_ids.discard(id(item))
            parts = [sizes[id(c)] for c in children if isinstance(c, (Mapping, list, tuple))]
            size = 1 + sum(p[0] for p in parts) + sum(1 for c in children if not isinstance(c, (Mapping, list, tuple)))
            depth = 1 + max((p[1] for p in parts), default=0)
            if size > MAX_VALUES:
                raise _error(f"{source}: expands to more than {MAX_VALUES} values through repeated aliases; write the "
                        "values out")
            if depth > MAX_DEPTH:
                raise _error(f"{source}: nested too deeply ({MAX_DEPTH} levels at most)")
            sizes[id(item)] = (size, depth)
            continue
        if id(item) in sizes:
            continue
        if id(item) in open_ids:
            raise _error(f"{source}: a value refers to itself (a YAML alias inside its own anchor)")
        if len(open_ids) >= MAX_DEPTH:
            raise _error(f"{source}: nested too deeply ({MAX_DEPTH} levels at most)")
        open_ids.add(id(item))
        stack.append((item, True))
        stack.extend((c, False) for c in children if isinstance(c, (Mapping, list, tuple)))
