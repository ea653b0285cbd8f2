"""Errors a user can cause. The CLI turns them into one line on stderr and a non-zero exit."""


class UserError(Exception):
    """A mistake in the user's input (a bad path, recipe key, argument, checkpoint).

    Raised by library code; `setok` prints `error: <message>` and exits with code 2.
    """
