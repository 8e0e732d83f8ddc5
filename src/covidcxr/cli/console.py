"""The command line's two consoles: results on stdout, warnings and errors on stderr."""

from __future__ import annotations

from rich.console import Console

console = Console()
err_console = Console(stderr=True)
