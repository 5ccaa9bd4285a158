"""The one user-error type of both CLIs.

Raised anywhere with a message that names the file, field or flag and what is allowed; caught only
at the CLI boundary, which prints it as one line and exits 2 (a traceback only with --debug).
"""


class UserError(Exception):
    """Bad input from the user: a profile, a config, a flag, a checkpoint that does not fit."""

    exit_code = 2
