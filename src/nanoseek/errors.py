"""The one exception type for bad user input: the CLI prints it as one line and exits non-zero."""


class NanoseekError(Exception):
    """A user-facing error: bad config, bad checkpoint, bad request. Message is one line."""
