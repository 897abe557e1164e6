"""The one exception type sd3trt raises for bad input; the CLI prints it as a one-line error."""


class Sd3trtError(Exception):
    """A problem the user can fix: the message names it and says how."""
