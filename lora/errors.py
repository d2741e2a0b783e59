"""The one error type users see: a message that names the problem and the fix."""


class LoraError(Exception):
    """Bad input (a file, a flag, a checkpoint). The CLI prints it without a traceback."""
