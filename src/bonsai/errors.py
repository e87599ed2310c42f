"""The one exception type users see; the CLI prints it in one line and exits non-zero."""


class BonsaiError(Exception):
    """A problem with the user's input or files; the message names the file and what to do."""


class DatasetError(BonsaiError):
    """A dataset cannot be read as given."""


class ConfigError(BonsaiError):
    """A configuration key or value is wrong."""
