"""Where the commands print their tables: stdout, at the table's full width off a terminal.

Rich assumes 80 columns when stdout is a file or a pipe, and folds or cuts a wider table
there, which is where scripts and logs read it.
"""

from __future__ import annotations

import sys

from rich.console import Console

#: The width given to rich off a terminal: wider than any table the commands print.
PIPE_WIDTH = 1000


def stdout_console() -> Console:
    """A console on stdout: the terminal's width on a terminal, else `PIPE_WIDTH`."""
    return Console(width=None if sys.stdout.isatty() else PIPE_WIDTH)
