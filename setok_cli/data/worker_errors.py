"""A `UserError` raised in a DataLoader worker process, back to its own one line.

torch re-raises a worker's exception in the main process as the same type whose message is
"Caught UserError in DataLoader worker process 0.\\nOriginal Traceback ...\\n
setok_cli.errors.UserError: <the message>". The user should see only <the message>.
"""
from __future__ import annotations

import re

__all__ = ["worker_message"]

_LAST_LINE = re.compile(r"^(?:[\w.]+\.)?UserError: ", re.M)


def worker_message(msg: str) -> str:
    """The original message of a worker's re-raised UserError; any other message unchanged."""
    if not msg.startswith("Caught UserError"):
        return msg
    found = list(_LAST_LINE.finditer(msg))
    return msg[found[-1].end():].strip() if found else msg
