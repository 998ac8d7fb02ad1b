"""User-facing errors: one line that names the problem and the fix."""


class SPDError(Exception):
    """An error caused by the user's input or environment, not by a bug.

    Entry points print ``str(err)`` as a single line and exit non-zero instead of a traceback.
    The message names what is wrong and how to fix it.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))
