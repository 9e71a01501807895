"""User-facing errors: one line that names the field or file and what is allowed.

Entry points catch :class:`UserInputError`, print ``error: <message>`` on stderr and exit with code 2
(no traceback unless ``--debug``). Library code raises it for anything a user can fix.
"""

from __future__ import annotations


class UserInputError(ValueError):
    """A bad value, file or setting supplied by the user. The message is a single line."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
