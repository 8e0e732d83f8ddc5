"""``python -m covidcxr.cli ...`` = the ``covidcxr`` command."""

from covidcxr.cli import main

main()
