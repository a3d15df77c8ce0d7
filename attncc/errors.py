"""Exceptions that attncc raises for user mistakes.

Every user-facing error says where the problem is, what was expected and what was received; the
CLI prints ``str(err)`` on one line and exits non-zero, with no traceback.
"""

from __future__ import annotations

import sys
import warnings


class AttnccError(Exception):
    """Base class of the errors attncc raises for user mistakes (never for its own bugs)."""


class SpecError(AttnccError, ValueError):
    """A spec file, dict or expression is malformed.

    ``file``, ``field`` and ``column`` (1-based, inside the field's expression) locate the
    problem; each is ``None`` where it does not apply.
    """

    def __init__(self, message: str, *, file: str | None = None, field: str | None = None,
                 column: int | None = None):
        self.message = message
        self.file = file
        self.field = field
        self.column = column
        where = [str(part) for part in (file, field) if part]
        if column is not None:
            where.append(f"column {column}")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class InputError(AttnccError, ValueError):
    """A tensor passed to a kernel has the wrong rank, shape, dtype or device, or is missing."""


class BackendError(AttnccError, RuntimeError):
    """A backend cannot be found, loaded, or cannot run the given spec on the given target."""


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the first frame outside attncc, its
    plugins (modules named ``attncc*``) and torch (which calls attncc's library ops and modules):
    the user's line, however deep inside attncc the warning is raised (a counted ``stacklevel``
    is right for one call path only)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and _passed_over(frame.f_globals.get("__name__")):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def _passed_over(module) -> bool:
    return isinstance(module, str) and (module.startswith("attncc") or module == "torch"
                                        or module.startswith("torch."))
