"""The one exception type that the CLI turns into a single clear line and a non-zero exit."""


class MslpipeError(Exception):
    """A problem with the user's input or environment, worded for the user.

    The message names the file (when there is one) and the reason, on one line.
    """

    def __init__(self, message: str, path: object | None = None):
        self.path = None if path is None else str(path)
        super().__init__(f"{path}: {message}" if path is not None else message)
