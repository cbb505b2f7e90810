"""Read YAML into plain data while remembering where every key and value came from.

PyYAML builds the node graph (with line/column marks); the walk below turns it into dicts and
lists itself, because the stock constructor silently keeps the last of duplicate keys, loses the
marks, and expands aliases without limit (a "billion laughs" file would exhaust memory).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import Problem, SpecError, dotted

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_ENV = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")
MAX_NODES = 200_000  # far beyond any real spec; an alias bomb crosses it within microseconds

Path_ = tuple  # a data path: ("steps", "base", "optimizer", "lr")


@dataclass(frozen=True)
class Mark:
    file: str
    line: int
    col: int


@dataclass
class Document:
    """Parsed YAML data, where each path came from, and which values came from the environment."""

    source: str
    data: Any
    keys: dict[Path_, Mark] = field(default_factory=dict)
    values: dict[Path_, Mark] = field(default_factory=dict)
    secrets: dict[Path_, str] = field(default_factory=dict)  # path -> original "${env:X}" text
    problems: list[Problem] = field(default_factory=list)  # non-fatal: reported with the schema's
    # a sweep's variant -> (its step, {field path: where the sweep sets it}) (schemas/sweep.py)
    variants: dict[str, tuple[str, dict]] = field(default_factory=dict)

    def written(self, path: Path_) -> Path_:
        """Where the file writes `path`: a sweep variant's fields are its step's, except those its sweep sets (so
        a problem every variant inherits is reported once, at the step)."""
        if len(path) < 2 or path[0] != "steps" or path[1] not in self.variants:
            return path
        base, places = self.variants[path[1]]
        rest = tuple(path[2:])
        return next((where for swept, where in places.items() if rest[:len(swept)] == swept), ("steps", base) + rest)

    def mark(self, path: Path_, key: bool = False) -> Mark:
        """Return the mark of path (its key or value), or of its nearest ancestor that has one."""
        table = self.keys if key else self.values
        for n in range(len(path), -1, -1):
            sub = tuple(path[:n])
            if sub in table:
                return table[sub]
            if sub in self.values:
                return self.values[sub]
        return Mark(self.source, 1, 1)

    def problem(self, path: Path_, message: str, key: bool = False) -> Problem:
        path = self.written(path)
        m = self.mark(path, key)
        return Problem(m.file, m.line, m.col, dotted(path), message)


def _mark(source: str, node: yaml.Node) -> Mark:
    return Mark(source, node.start_mark.line + 1, node.start_mark.column + 1)


class _Builder:
    def __init__(self, doc: Document):
        self.doc = doc
        self.problems: list[Problem] = []
        self.count = 0
        self.scalars = yaml.constructor.SafeConstructor()

    def build(self, node: yaml.Node, path: Path_) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise _TooBig()
        self.doc.values.setdefault(path, _mark(self.doc.source, node))
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
        value = self.scalars.construct_object(node)
        return self._interpolate(value, path) if isinstance(value, str) else value

    def _mapping(self, node: yaml.MappingNode, path: Path_) -> dict:
        out: dict = {}
        first: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`
                merged = self.build(value_node, path)
                for part in merged if isinstance(merged, list) else [merged]:
                    if isinstance(part, dict):
                        for k, v in part.items():
                            out.setdefault(k, v)
                continue
            key = self.scalars.construct_object(key_node) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, (str, int, float, bool)) or key is None:
                m = _mark(self.doc.source, key_node)
                self.problems.append(Problem(m.file, m.line, m.col, dotted(path), "keys must be plain scalars"))
                continue
            key = str(key) if not isinstance(key, str) else key
            here = _mark(self.doc.source, key_node)
            if key in first:
                self.problems.append(Problem(here.file, here.line, here.col, dotted(path + (key,)),
                                             f"duplicate key '{key}' (first defined at line {first[key].line})"))
                continue
            first[key] = here
            self.doc.keys[path + (key,)] = here
            out[key] = self.build(value_node, path + (key,))
        return out

    def _interpolate(self, text: str, path: Path_) -> str:
        if "${env:" not in text:
            return text

        def sub(match: re.Match) -> str:
            name = match.group(1)
            if name not in os.environ:
                self.problems.append(self.doc.problem(path, f"environment variable {name} is not set "
                                                            f"(referenced as ${{env:{name}}})"))
                return ""
            return os.environ[name]

        self.doc.secrets[path] = text
        return _ENV.sub(sub, text)


class _TooBig(Exception):
    pass


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Count the nodes `node` expands to, each shared (aliased) node sized once: linear in the file."""
    if id(node) in sizes:
        if sizes[id(node)] == 0:  # still being counted: the node contains itself
            raise _TooBig("an alias refers to the collection it is in")
        return sizes[id(node)]
    sizes[id(node)] = 0
    size = 1
    if isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(item, sizes) for item in node.value)
    if size > MAX_NODES:
        raise _TooBig()
    sizes[id(node)] = size
    return size


def _check_bytes(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        col = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise SpecError([Problem(source, line, col, "",
                                 f"file is not valid UTF-8 (byte 0x{raw[err.start]:02x}); save it as UTF-8")])


def _tab_problems(text: str, source: str) -> list[Problem]:
    problems = []
    for n, line in enumerate(text.splitlines(), 1):
        indent = line[: len(line) - len(line.lstrip(" \t"))]
        if "\t" in indent:
            problems.append(Problem(source, n, indent.index("\t") + 1, "",
                                    "tab character in indentation; YAML indents with spaces"))
    return problems


def parse_text(text: str, source: str) -> Document:
    """Parse YAML text into a Document; raise SpecError listing every problem found."""
    problems = _tab_problems(text, source)
    if problems:
        raise SpecError(problems)
    try:
        root = yaml.compose(text, Loader=_Loader)
    except RecursionError:
        raise SpecError([Problem(source, 1, 1, "", "document is nested too deeply")]) from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        what = " ".join(x for x in (err.context, err.problem) if x)
        raise SpecError([Problem(source, line, col, "", f"YAML syntax error: {what}")]) from None
    except yaml.YAMLError as err:
        raise SpecError([Problem(source, 1, 1, "", f"YAML error: {err}")]) from None
    doc = Document(source=source, data=None)
    if root is None:
        raise SpecError([Problem(source, 1, 1, "", "file is empty; expected a mapping with 'name' and 'steps'")])
    if not isinstance(root, yaml.MappingNode):
        what = "a list" if isinstance(root, yaml.SequenceNode) else "a single value"
        m = _mark(source, root)
        raise SpecError([Problem(source, m.line, m.col, "", f"top level must be a mapping of keys, got {what}")])
    builder = _Builder(doc)
    try:
        _expanded_size(root, {})  # an alias bomb is refused before a single node is built
        doc.data = builder.build(root, ())
    except _TooBig as err:
        why = str(err) or f"document expands to more than {MAX_NODES} nodes (aliases nested too deep?)"
        raise SpecError([Problem(source, 1, 1, "", f"{why}; refusing to expand it")]) from None
    except RecursionError:
        raise SpecError([Problem(source, 1, 1, "", "document is nested too deeply")]) from None
    doc.problems = builder.problems
    return doc


def parse_file(path: str | os.PathLike) -> Document:
    """Read and parse a YAML file."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise SpecError([Problem(source, 1, 1, "", f"cannot read file: {err.strerror}")]) from None
    return parse_text(_check_bytes(raw, source), source)


def _joined(data: Any, path: tuple) -> tuple:
    """The override path with parts joined where the file has a key with dots in it (a sweep's `optimizer.lr`)."""
    out, node, i = [], data, 0
    while i < len(path):
        j = next((j for j in range(len(path), i + 1, -1) if isinstance(node, dict)
                  and ".".join(map(str, path[i:j])) in node), i + 1)
        part = ".".join(map(str, path[i:j])) if j > i + 1 else path[i]
        out.append(part)
        if isinstance(node, dict):
            node = node.get(part)
        else:
            node = node[part] if isinstance(node, list) and isinstance(part, int) and part < len(node) else None
        i = j
    return tuple(out)


def apply_overrides(doc: Document, overrides: list[str]) -> None:
    """Apply `--set a.b.c=value` overrides in place; values are parsed as YAML scalars or flow YAML.

    Malformed overrides join `doc.problems`, so they are reported together with the schema's errors.
    """
    problems = []
    for n, item in enumerate(overrides, 1):
        source = f"--set[{n}]"
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(Problem(source, 1, 1, "", f"expected KEY=VALUE, got '{item}'"))
            continue
        path = _joined(doc.data, tuple(int(p) if p.isdigit() else p for p in key.strip().split(".")))
        try:
            value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        mark = Mark(source, 1, len(key) + 2)
        container = doc.data
        for i, part in enumerate(path[:-1]):
            if isinstance(container, dict):
                container = container.setdefault(part, {})
            elif isinstance(container, list) and isinstance(part, int) and part < len(container):
                container = container[part]
            else:
                problems.append(Problem(source, 1, 1, dotted(path[: i + 1]), "cannot set a field inside a value"))
                break
        else:
            last = path[-1]
            if isinstance(container, dict):
                container[last] = value
            elif isinstance(container, list) and isinstance(last, int) and last < len(container):
                container[last] = value
            else:
                problems.append(Problem(source, 1, 1, dotted(path), "cannot set a field inside a value"))
                continue
            here = dotted(path)  # an override replaces the value, and the problems the old one had
            doc.problems = [p for p in doc.problems
                            if p.path != here and not p.path.startswith((here + ".", here + "["))]
            stale = [p for p in doc.values if p[: len(path)] == path]
            for p in stale:
                doc.values.pop(p, None)
                doc.keys.pop(p, None)
                doc.secrets.pop(p, None)
            doc.values[path] = mark
            doc.keys[path] = Mark(source, 1, 1)
    doc.problems.extend(problems)
