"""The ``ghostproj`` command line: one small function per command, no maths here."""

from . import run_commands, store_commands  # noqa: F401  (each registers its commands with the app)
from .app import app, main

__all__ = ["app", "main"]
