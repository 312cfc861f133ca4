"""Benchmark scripts: each prints a table and writes its figures as JSON, with the device, commit and command."""

from __future__ import annotations

import sys
from collections.abc import Callable

from quant.errors import MoEOffloadError


def run_script(main: Callable[[], None]) -> None:
    """A script's entry: a user error (a missing file, a bad option) is one line and exit code 2, as the CLI's."""
    try:
        main()
    except MoEOffloadError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
