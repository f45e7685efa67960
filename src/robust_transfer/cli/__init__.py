"""The ``robust-transfer`` command line: :mod:`.parser` reads the arguments (each
checked by its type in :mod:`.arguments`), :mod:`.commands` runs them through the
library's entry points, priced first by :mod:`.plan_command` when asked."""

from .commands import main

__all__ = ["main"]
