"""The ``robust-transfer`` command line: :mod:`.parser` reads and checks the arguments,
:mod:`.commands` runs them through the library's entry points."""

from .commands import main

__all__ = ["main"]
