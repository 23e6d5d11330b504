"""User-facing errors: one sentence that names the file, key or tensor.

The CLI prints `hmoe: error: <message>` for these and exits 2; anything else is a bug and keeps
its traceback.
"""


class HmoeError(Exception):
    """An error caused by the user's input (a file, a key, an option), not by a bug."""


class ConfigError(HmoeError):
    pass


class CheckpointError(HmoeError):
    pass


class ContextLimitError(HmoeError):
    pass
