"""Shared CLI behaviour: user errors become one line on stderr and exit code 2."""
from __future__ import annotations

import sys
from typing import Callable


class UsageError(ValueError):
    """Bad input from the user; the message says what to do."""


def run(main: Callable[[], int | None]) -> None:
    """Run `main`; ValueError/FileNotFoundError/KeyboardInterrupt exit cleanly with one line."""
    try:
        code = main()
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
