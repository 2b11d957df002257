"""Reading the files users name, and checking the ones they ask us to write: one set of rules.

Every model, cluster, search-space and profile file goes through `read_text`: a path that is
missing, a directory or not a regular file (a FIFO, `/dev/zero`), larger than its bound, empty,
binary (a NUL byte) or not UTF-8 is refused with one `ConfigError` naming the flag or key, before
anything parses it. YAML goes through `load_yaml`: PyYAML's `safe_load` (tags such as
`!!python/object` are refused) with duplicate keys refused, naming the key and both lines, where
`safe_load` alone would keep the last one silently. Output paths (`--out`) go through
`check_output` before any measuring starts.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from autotune.errors import ConfigError

MAX_YAML_BYTES = 1 << 20  # a model, cluster or search space: a page of YAML, never megabytes
MAX_PROFILE_BYTES = 16 << 20  # a profile: a few hundred entries of JSON
MAX_YAML_NODES = 100_000  # scalars, sequences and mappings after aliases are resolved


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


def read_text(path: str | os.PathLike[str], field: str, *, what: str, max_bytes: int) -> str:
    """The UTF-8 text of the file at `path` (a `what`: "model YAML", ...), or one ConfigError."""
    name = str(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(field, f"no such file {name!r}") from None
    except OSError as exc:
        raise ConfigError(field, f"cannot read {name!r}: {exc.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ConfigError(field, f"{name!r} is a directory, not a {what} file")
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(field, f"{name!r} is not a regular file (a device, pipe or socket), not a {what}")
    if info.st_size > max_bytes:
        raise ConfigError(
            field, f"{name!r} is {_size(info.st_size)}, over the {_size(max_bytes)} bound for a {what} file"
        )
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as exc:
        raise ConfigError(field, f"cannot read {name!r}: {exc.strerror}") from None
    if len(raw) > max_bytes:  # grew since the stat
        raise ConfigError(field, f"{name!r} is over the {_size(max_bytes)} bound for a {what} file")
    if not raw.strip():
        raise ConfigError(field, f"{name!r} is empty, not a {what} file")
    if b"\0" in raw:
        raise ConfigError(field, f"{name!r} is a binary file, not a {what} file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        byte = raw[exc.start]
        raise ConfigError(
            field, f"{name!r} is not UTF-8 text (byte 0x{byte:02x} at offset {exc.start}), not a {what} file"
        ) from None


class _Loader(yaml.SafeLoader):
    """`safe_load`'s loader, refusing duplicate mapping keys and documents of absurd size: the
    size counts a node once per alias to it (a few hundred bytes of nested aliases would expand
    to millions of values wherever they are walked, printed in an error message included)."""

    def compose_document(self) -> Any:
        node = super().compose_document()
        if node is not None:
            _expanded(node, {}, set())
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader says so below
                continue
            line = key_node.start_mark.line + 1
            if first is not None:
                raise _Duplicate(key, first, line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """The node's size with every alias expanded; _TooBig above MAX_YAML_NODES or for a node
    that contains itself."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise _TooBig()
    open_.add(key)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded(item, sizes, open_) for item in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded(k, sizes, open_) + _expanded(v, sizes, open_) for k, v in node.value)
    open_.discard(key)
    if size > MAX_YAML_NODES:
        raise _TooBig()
    sizes[key] = size
    return size


class _Duplicate(Exception):
    def __init__(self, key: Any, first: int, again: int) -> None:
        super().__init__(key)
        self.key, self.first, self.again = key, first, again


class _TooBig(Exception):
    pass


def yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: what PyYAML found wrong, and where."""
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem is None:
        return " ".join(str(exc).split())
    mark = exc.problem_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = f"{exc.context}: " if exc.context else ""
    return f"{context}{exc.problem}{where}"


def load_yaml(text: str, field: str, *, source: str | None = None) -> Any:
    """`yaml.safe_load(text)`, refusing duplicate keys; errors are ConfigError(`field`, ...),
    their rule starting with the file's name (`source`) where there is one."""
    head = f"{source!r} " if source else ""
    loader = None
    try:
        loader = _Loader(text)  # reads the stream: refuses control characters already
        return loader.get_single_data()
    except _Duplicate as dup:
        rule = (
            f"has a duplicate key {dup.key!r} at line {dup.again} (first at line {dup.first}); give it once"
        )
        raise ConfigError(field, head + rule) from None
    except _TooBig:
        raise ConfigError(
            field, f"{head}has more than {MAX_YAML_NODES:,} YAML nodes; not a configuration"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(field, f"{head}is not valid YAML: {yaml_problem(exc)}") from None
    except RecursionError:
        raise ConfigError(field, f"{head}is nested too deeply to be a configuration") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml(path: str | os.PathLike[str], field: str, *, what: str) -> Any:
    """A YAML file's data: `read_text` then `load_yaml`, errors naming `field` and the file."""
    text = read_text(path, field, what=what, max_bytes=MAX_YAML_BYTES)
    return load_yaml(text, field, source=str(path))


def check_output(path: str | os.PathLike[str], field: str) -> Path:
    """A path we are about to write a file at (atomically: a temporary file in its folder, then
    renamed over it): refused with one line if it is a directory or not a regular file, or its
    folder is missing or cannot be written; checked before any work, so nothing is measured in
    vain."""
    target = Path(path)
    name = str(path)
    if target.is_dir():
        raise ConfigError(field, f"{name!r} is a directory; name a file in it")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise ConfigError(field, f"folder {str(folder)!r} of {name!r} does not exist; create it first")
    if target.exists() and not target.is_file():
        raise ConfigError(field, f"{name!r} is not a regular file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(
            field, f"folder {str(folder)!r} cannot be written (no permission, or a read-only file system)"
        )
    return target
