"""The one exception type for errors a user can cause (bad paths, corrupt files, what cannot fit).

It lives in quant/, the bottom of the import graph (`cli -> offload -> cache, quant`), so every room
can raise it. Its message names the bad thing and what to do; the CLI prints it as one line and
exits with code 2. Programming errors stay ordinary exceptions.
"""

import numbers


class MoEOffloadError(Exception):
    """A user-facing error: bad input, a file that does not check out, a budget that cannot fit."""


def whole_number(value: object) -> int | None:
    """`value` as a Python int if it is a whole number (numpy's too), else None: True is no count, nor is 2.0.

    What a Python caller gives a count, a seed or a token id goes through this, so a numpy number is taken as
    the CLI's parsed int would be, and JSON written from it stays plain."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return None
