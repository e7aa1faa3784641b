"""The one exception type for bad user input: the CLI prints it as one line and exits non-zero."""


class NanoseekError(Exception):
    """A user-facing error: bad config, bad checkpoint, bad request. Message is one line."""


def dotted_location(loc: tuple) -> str:
    """A pydantic error's location as one name, as users write it: `messages[0].role`, `data.files`."""
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
