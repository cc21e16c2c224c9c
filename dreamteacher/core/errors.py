"""One exception type for mistakes a user can fix; the CLI prints it as one line."""


class UserError(Exception):
    """Bad input or settings: the message names the file or setting and what to do."""
