"""The one exception type for user mistakes.

Every message names the field, the value and what is allowed, so the CLI can print it on a
single line and exit non-zero without a traceback. Values are shown through
:func:`short_repr`: bounded in length and in the work it takes (a hostile value -- a deeply
nested or alias-expanded structure, a megabyte string -- never expands into the message).
"""

from __future__ import annotations

import reprlib

#: The longest value representation an error message shows.
MAX_VALUE_CHARS = 80

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxtuple = _REPR.maxlist = _REPR.maxarray = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdeque = 6
_REPR.maxdict = 6
_REPR.maxstring = MAX_VALUE_CHARS
_REPR.maxlong = 40
_REPR.maxother = MAX_VALUE_CHARS


def short_repr(value, limit: int = MAX_VALUE_CHARS) -> str:
    """``repr(value)`` cut to at most ``limit`` characters, computed without expanding the value
    (at most a few levels and elements of a container are looked at; one line)."""
    try:
        s = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a value whose repr fails must not hide the error itself
        s = f"<{type(value).__name__}>"
    s = s.replace("\n", " ").replace("\r", " ")
    return s if len(s) <= limit else s[:limit - 3] + "..."


class ConfigError(ValueError):
    """A user mistake in a config, an argument or a data file.

    ``field`` is the dotted name of the offending setting (or ``None``), ``value`` the value
    that was given and ``allowed`` a short description of what would have been accepted.
    """

    def __init__(self, message: str, *, field: str | None = None, value=None, allowed: str | None = None):
        self.field = field
        self.value = value
        self.allowed = allowed
        parts = []
        if field is not None:
            parts.append(f"{field}: ")
        parts.append(message)
        if value is not None:
            shown = short_repr(value)
            if shown not in message:
                parts.append(f" (got {shown})")
        if allowed:
            parts.append(f"; allowed: {allowed}")
        super().__init__("".join(parts).replace("\n", " ").replace("\r", " "))


class TheoryNotApplicable(ValueError):
    """Raised when a quantity is undefined for a problem (tau = 0, NTK scaling, unbounded
    activation for an LSI bound, ...). The message says which assumption fails."""
