"""The one exception type for errors a user can cause (bad paths, corrupt files, what cannot fit).

It lives in quant/, the bottom of the import graph (`cli -> offload -> cache, quant`), so every room
can raise it. Its message names the bad thing and what to do; the CLI prints it as one line and
exits with code 2. Programming errors stay ordinary exceptions.
"""


class MoEOffloadError(Exception):
    """A user-facing error: bad input, a file that does not check out, a budget that cannot fit."""
