"""The one way the project reads a user's YAML/JSON config or params file, and a `--set` value.

Why its own loader and not `yaml.safe_load`: safe_load is safe against code execution, not against
the other things a config path or value can be. Measured on main c398987: a FIFO or `/dev/zero`
given as `--config`/`--params-file` hung (read() never returns or never ends); a 416-byte alias
bomb (nine levels of nine aliases) is ~387 million nodes once expanded and hung the first walk over
it (`dataclasses.asdict`, the config hash); ten thousand nested brackets raised a RecursionError
traceback from the composer; and a key given twice silently kept the last value. So:

- the path must be a regular file (amft_lib.regular_file: a FIFO does not block, a symlink to a
  device is judged by what it points at), at most `MAX_CONFIG_BYTES`, valid UTF-8;
- the YAML is composed (not yet constructed) with a nesting bound of `MAX_DEPTH`, then its size
  *with aliases expanded* is counted on the node graph (shared nodes counted once per use, with a
  memo, so counting a bomb is cheap) and refused above `MAX_NODES`; a self-referencing alias is
  refused; a mapping key given twice is refused naming both lines;
- every failure is a ConfigError whose one line names the file (or the `--set` item), the line
  when there is one, and why.

JSON is YAML here (a JSON params file goes through the same checks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from amft_lib.errors import UserError
from amft_lib.regular_file import read_regular_file

MAX_CONFIG_BYTES = 1 << 20  # 1 MiB: the biggest config in configs/ is ~2 KB
MAX_DEPTH = 64  # nested mappings/lists; real configs use 3
MAX_NODES = 100_000  # scalars + collections after alias expansion; real configs have a few hundred


class ConfigError(UserError, ValueError):
    """A configuration value or file is invalid; the message names the field and the fix."""


def read_config_text(path: str | Path, what: str = "config file", max_bytes: int = MAX_CONFIG_BYTES) -> str:
    """The UTF-8 text of a regular file of at most `max_bytes`; ConfigError (one line) otherwise."""
    data = read_regular_file(path, what, max_bytes, ConfigError)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; give a YAML file") from None


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that stops composing past MAX_DEPTH and refuses duplicate mapping keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _Refused(f"line {mark.line + 1}: nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` merges; explicit keys may override them
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader's own error says so below
                continue
            if first is not None:
                raise _Refused(f"line {line}: duplicate key {key!r} (first at line {first}); each key may appear once")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


class _Refused(Exception):
    """A bound was hit; turned into a ConfigError naming the source."""


def expanded_size(root: Node, limit: int = MAX_NODES) -> int:
    """Nodes in the document with every alias expanded, counted without expanding anything.

    Iterative post-order walk with a memo per node, so an alias bomb costs one visit per distinct
    node; a node reached again while still on the path is a self-referencing alias (_Refused).
    Stops early (_Refused) once the count passes `limit`.
    """
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            children = _children(node)
            total = 1 + sum(size[id(c)] for c in children)
            if total > limit:
                raise _Refused(f"line {node.start_mark.line + 1}: expands to more than {limit} values "
                               "(YAML aliases multiply); write the values out")
            size[key] = total
            continue
        if key in size:
            continue
        if key in on_path:
            raise _Refused(f"line {node.start_mark.line + 1}: an alias refers to itself")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in size)
    return size[id(root)]


def _children(node: Node) -> list[Node]:
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, SequenceNode):
        return list(node.value)
    return []


def parse_yaml(text: str, where: str) -> Any:
    """Parse one YAML (or JSON) document with the bounds above; `where` prefixes every error.

    Composing and construction are separate so the size check runs before any Python object
    exists; construction of a checked graph is then linear in its distinct nodes.
    """
    loader = _BoundedLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        expanded_size(root)
        return loader.construct_document(root)
    except _Refused as exc:
        raise ConfigError(f"{where}:{exc}") from None
    except yaml.YAMLError as exc:
        first = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{where}: not valid YAML{at} ({first})") from None
    except RecursionError:  # unreachable with MAX_DEPTH; kept so a parse can never be a traceback
        raise ConfigError(f"{where}: nested too deeply") from None
    finally:
        loader.dispose()


def load_mapping_file(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML/JSON file whose top level is a mapping (empty file: {}), read and parsed safely."""
    data = parse_yaml(read_config_text(path, what), str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def parse_value(raw: str, where: str) -> Any:
    """A `--set KEY=VALUE` value parsed as YAML with the same bounds (a bomb fits in one argument)."""
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: value is longer than {MAX_CONFIG_BYTES} characters")
    return parse_yaml(raw, where)


__all__ = ["MAX_CONFIG_BYTES", "MAX_DEPTH", "MAX_NODES", "ConfigError", "expanded_size", "load_mapping_file",
           "parse_value", "parse_yaml", "read_config_text"]
