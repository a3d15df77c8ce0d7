"""Writing the generated functions: ``Fn`` (one ``@triton.jit`` function whose parameters are
the names its body reads) and the line layout (one argument group per line, at most 100 columns,
unused unpacked names as ``_``), so that the module passes ``ruff check``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .printer import enclosed

WORD = re.compile(r"[A-Za-z_]\w*")
#: The kernels' constexpr parameters (Fn flags are constexprs too).
CONSTS = ("ACC", "PREC", "MEM", "TOPK", "BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV")


def _wrap(words: list[str], indent: str, width: int = 100) -> list[str]:
    """``words`` joined by ", " into lines of at most ``width`` columns, each ending in ","."""
    lines, line = [], ""
    for word in words:
        if line and len(indent) + len(line) + len(word) + 2 > width:
            lines.append(indent + line.rstrip())
            line = ""
        line += word + ", "
    return [*lines, indent + line.rstrip()] if line else lines


@dataclass
class Fn:
    """One ``@triton.jit`` function: its parameters are the candidates (in groups, one line
    each) that its body reads; ``flags`` are constexprs passed by keyword."""

    name: str
    doc: str
    groups: list[list[str]]
    body: list[str]
    flags: tuple[str, ...] = ()

    def __post_init__(self):
        self.body = _unpack_unused(self.body)
        used = set(WORD.findall("\n".join(self.body)))
        self.groups = [[p for p in g if p in used] for g in self.groups]
        self.groups = [g for g in self.groups if g]
        self.flags = tuple(f for f in self.flags if f in used)

    @property
    def params(self) -> list[str]:
        return [p for g in self.groups for p in g]

    def text(self) -> str:
        const = set(CONSTS) | set(self.flags)
        lines = ["@triton.jit", f"def {self.name}("]
        for group in [*self.groups, list(self.flags)]:
            lines += _wrap([f"{p}: tl.constexpr" if p in const else p for p in group], "    ")
        lines += ["):", f'    """{self.doc}"""']
        lines += [x for b in self.body for x in _fit("    " + b if b else "")]
        return "\n".join(lines) + "\n"

    def call(self, result: str, subs: dict | None = None, **flags) -> list[str]:
        """The lines of ``result = name(...)`` (no result: a bare call), names replaced by
        ``subs`` and flags given by keyword (flags not given pass the caller's own)."""
        subs = subs or {}
        lines = [f"{result} = {self.name}(" if result else f"{self.name}("]
        # 88 columns: a call sits up to three levels deep in a kernel's body
        for group in self.groups:
            lines += _wrap([str(subs.get(p, p)) for p in group], "    ", 88)
        lines += _wrap([f"{f}={flags.get(f, f)}" for f in self.flags], "    ", 88)
        return [*lines, ")"]


def indent(lines: list[str]) -> list[str]:
    return ["    " + x if x else x for x in lines]


def paren(text: str) -> str:
    """``text`` in parentheses unless one pair already encloses all of it."""
    return text if enclosed(text) else f"({text})"


_UNPACK = re.compile(r"^(\s*)([\w, ]+) = (_\w+\()$")


def _unpack_unused(body: list[str]) -> list[str]:
    """``_`` for the names a tuple assignment from a call binds that no other line reads."""
    result = list(body)
    for i, line in enumerate(body):
        found = _UNPACK.match(line)
        if found is None or "," not in found.group(2):
            continue
        rest = set(WORD.findall("\n".join(body[:i] + body[i + 1:])))
        names = [n if n in rest else "_" for n in found.group(2).split(", ")]
        result[i] = f"{found.group(1)}{', '.join(names)} = {found.group(3)}"
    return result


def _fit(line: str, width: int = 100) -> list[str]:
    """``line`` broken inside its parentheses, after a comma or before an operator, into
    lines of at most ``width`` columns where it can be (continuations indented 4 more)."""
    lines, indent = [], " " * (len(line) - len(line.lstrip()) + 4)
    opened = 0  # parentheses left open by the pieces already cut off
    while len(line) > width:
        depth, best = opened, None
        for i, c in enumerate(line[:width]):
            depth += (c in "([") - (c in ")]")
            if depth > 0 and line.startswith((", ", " + ", " - ", " & ", " | ", " * "), i):
                best, at = (i + 1 if c == "," else i), depth
        if best is None or line[:best].strip() == "":
            break
        lines.append(line[:best].rstrip())
        line, opened = indent + line[best:].lstrip(), at
    return [*lines, line]
