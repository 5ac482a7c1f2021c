"""Which exceptions are the user's to fix (shown as one line by the CLI) rather than bugs (shown with a traceback)."""

from __future__ import annotations

import json

USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, NotADirectoryError, PermissionError, ValueError,
                                                json.JSONDecodeError, OSError)


def is_user_error(e: BaseException) -> bool:
    return isinstance(e, USER_ERRORS)
