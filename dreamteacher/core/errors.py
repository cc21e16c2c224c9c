"""One exception type for mistakes a user can fix; the CLI prints it as one line."""


class UserError(Exception):
    """Bad input or settings: the message names the file or setting and what to do."""


class Diverged(Exception):
    """Training produced a non-finite loss or non-finite weights: the run stops at that step and keeps
    its last good checkpoint and exports; the message names the step and the loss terms."""
