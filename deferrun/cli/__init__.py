"""The ``deferrun`` command. Internal, but for ``main``, the console script's entry point."""

from deferrun.cli.commands import main

__all__ = ["main"]
