"""Reading specs: a path (YAML, TOML or JSON by extension), spec text, a dict, or a Spec."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import yaml

from attncc.errors import SpecError
from attncc.spec.schema import Spec, validate

EXTENSIONS = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".json": "json"}
MAX_FILE_BYTES = 1 << 20


def load_spec(source) -> Spec:
    """Return the validated Spec for ``source``.

    ``source`` is a Spec (returned as is), a dict, a path to a ``.yaml``, ``.yml``, ``.toml`` or
    ``.json`` file, or the text of a spec in any of the three formats. Raises SpecError naming the
    file and field on any problem.
    """
    if isinstance(source, Spec):
        return source
    if isinstance(source, dict):
        return validate(source)
    if isinstance(source, os.PathLike) or (isinstance(source, str) and _looks_like_path(source)):
        return _load_file(Path(source))
    if isinstance(source, str):
        return validate(_parse_text(source, None, _guess_format(source)))
    raise SpecError(f"expected a path, spec text, a dict or a Spec, got {type(source).__name__}")


def _looks_like_path(text: str) -> bool:
    return "\n" not in text and (Path(text).suffix.lower() in EXTENSIONS or os.path.exists(text))


def _load_file(path: Path) -> Spec:
    fmt = EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise SpecError(f"unknown extension '{path.suffix}'; expected one of "
                        + ", ".join(EXTENSIONS), file=str(path))
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise SpecError(f"file is larger than {MAX_FILE_BYTES} bytes", file=str(path))
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError("no such file", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"cannot read the file: {err}", file=str(path)) from None
    data = _parse_text(text, str(path), fmt)
    if isinstance(data, dict) and "name" not in data:
        data = {**data, "name": path.stem}
    return validate(data, file=str(path))


def _guess_format(text: str) -> str:
    stripped = text.lstrip()
    if stripped.startswith("{"):
        return "json"
    first = stripped.splitlines()[0] if stripped else ""
    if "=" in first and ":" not in first.split("=", 1)[0]:
        return "toml"
    return "yaml"


def _parse_text(text: str, file: str | None, fmt: str):
    try:
        if fmt == "json":
            return json.loads(text)
        if fmt == "toml":
            return tomllib.loads(text)
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except json.JSONDecodeError as err:
        raise SpecError(f"not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})",
                        file=file) from None
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"not valid TOML: {err}", file=file) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise SpecError(f"not valid YAML: {problem}{where}", file=file) from None
    except RecursionError:
        raise SpecError(f"{fmt} nests too deeply", file=file) from None
    except TypeError as err:  # e.g. a YAML mapping or list used as a key
        raise SpecError(f"not a valid spec: {err}; keys must be plain names", file=file) from None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of keeping the last one silently, and
    aliases (``*name``), whose repeated expansion lets a few bytes grow into gigabytes."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a "
                                              "spec", self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)
