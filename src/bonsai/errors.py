"""The one exception type users see; the CLI prints it in one line and exits non-zero."""


class BonsaiError(Exception):
    """A problem with the user's input or files; the message names the file and what to do."""


class DatasetError(BonsaiError):
    """A dataset cannot be read as given."""


class ConfigError(BonsaiError):
    """A configuration key or value is wrong."""


class Interrupted(BonsaiError):
    """Ctrl-C or SIGTERM stopped a fit before any epoch finished; ``code`` is the exit code (130 / 143)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code
