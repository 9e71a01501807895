"""User-facing errors: one line that names the field or file and what is allowed.

Entry points catch :class:`UserInputError`, print ``error: <message>`` on stderr and exit with code 2
(no traceback unless ``--debug``). Library code raises it for anything a user can fix.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable


class UserInputError(ValueError):
    """A bad value, file or setting supplied by the user. The message is a single line."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty): what one-line errors quote
    of a library's exception."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def run_cli(main: Callable[[list[str]], int], argv: list[str] | None) -> int:
    """Run ``main(argv)``; a :class:`UserInputError` becomes one stderr line and exit code 2 (traceback: --debug)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if not debug:
        warnings.filterwarnings("ignore")
        logging.getLogger("transformers").setLevel(logging.ERROR)
    if int(os.environ.get("RANK", "0")) > 0:  # under a launcher the main process reports; the others only fail
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
        logging.getLogger("zerosiam_llm").setLevel(logging.ERROR)
    try:
        return main([a for a in argv if a != "--debug"])
    except SystemExit as exit_:  # argparse's --help
        return exit_.code if isinstance(exit_.code, int) else 0
    except UserInputError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
