"""The one kind of error the command line reports in one line (exit code 2, no traceback): a mistake in what
the user gave (a config key, a file, a flag) that the message alone says how to fix. Every package's own input
errors derive from it; anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """The message names what to fix: the config key, the file, the flag."""
