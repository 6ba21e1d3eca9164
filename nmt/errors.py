"""The one error type users see: a one-line message, exit code 2 in the CLI."""

from __future__ import annotations

import sys
from collections.abc import Callable


class NmtError(Exception):
    """A user-facing error: what is wrong and where (file:line or config key path)."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def run_reporting_errors(main: Callable[[], object]) -> None:
    """Run a script's main(): an NmtError becomes `error: ...` on stderr and exit code 2, without a
    traceback (the CLI's own entry point does the same, plus its torchrun handling)."""
    try:
        main()
    except NmtError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(NmtError.exit_code)
