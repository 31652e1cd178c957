"""The one exception type users see as a clear sentence instead of a traceback."""


class GhostprojError(Exception):
    """A problem with the user's input or environment; its message is one sentence."""
