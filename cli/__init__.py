"""The `moe-offload` console script (cli/app.py is the app)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """cli.app.main, imported here so that Ctrl-C while torch loads (seconds) exits 130 as it does later,
    not with a traceback of the import."""
    try:
        from cli.app import main as run
    except KeyboardInterrupt:
        return 130
    return run(argv)
