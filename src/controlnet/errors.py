"""User-facing errors: one line that names the problem and the fix.

Library code raises :class:`UserError` for bad input (wrong image, wrong checkpoint family, mismatched sizes,
corrupt file). The CLI prints its message alone and exits with code 2, never a traceback.
"""

from __future__ import annotations

# Exit code of the CLI for bad input (argparse uses the same code for bad arguments).
EXIT_BAD_INPUT = 2


class UserError(Exception):
    """Bad input from the user; the message is one line naming the problem and the fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # keep it one line
