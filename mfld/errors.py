"""The one exception type for user mistakes.

Every message names the field, the value and what is allowed, so the CLI can print it on a
single line and exit non-zero without a traceback.
"""

from __future__ import annotations


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
        if value is not None and f"{value!r}" not in message:
            parts.append(f" (got {value!r})")
        if allowed:
            parts.append(f"; allowed: {allowed}")
        super().__init__("".join(parts).replace("\n", " "))


class TheoryNotApplicable(ValueError):
    """Raised when a quantity is undefined for a problem (tau = 0, NTK scaling, unbounded
    activation for an LSI bound, ...). The message says which assumption fails."""
