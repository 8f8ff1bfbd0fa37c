"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class OrchestrateError(Exception):
    """A problem the user can act on; its message is printed as one line."""


class ToolError(OrchestrateError):
    """A llama-* tool failed; log: where its output is kept, if anywhere."""

    def __init__(self, message: str, log=None):
        super().__init__(message)
        self.log = log
