"""The one exception type for errors a user can fix."""


class MagpieError(Exception):
    """An error the user can fix; its message is one line that says how. The CLI exits with 2."""
