"""The one exception type users see: a readable, one-line message and an exit status."""


class DistillError(Exception):
    """An error caused by the user's input or environment, shown as one line (traceback with --debug).

    Args:
        message: what went wrong and, where possible, what to do about it.
        exit_code: process exit status for the CLI (1 by default; 3 when a gate refuses).
    """

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
