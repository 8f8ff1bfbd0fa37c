"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class OrchestrateError(Exception):
    """A problem the user can act on; its message is printed as one line."""
