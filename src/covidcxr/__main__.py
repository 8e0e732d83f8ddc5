"""``python -m covidcxr ...`` = the ``covidcxr`` command (also ``torchrun ... -m covidcxr train ...``)."""

from covidcxr.cli import main

main()
