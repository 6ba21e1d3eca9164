"""The one error type users see: a one-line message, exit code 2 in the CLI."""


class NmtError(Exception):
    """A user-facing error: what is wrong and where (file:line or config key path)."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message
