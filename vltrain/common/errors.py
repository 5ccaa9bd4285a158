"""The error types both CLIs show as one line (vltrain.common.cligroup is the boundary).

`UserError`: bad input, raised anywhere with a message that names the file, field or flag and what
is allowed; exit 2. `ServiceUnavailable`: a service the command needs did not answer (Slurm's
controller, accounting); callers that can go on without it read `.reason`, never the message text;
exit 3 when it reaches the user. Programming errors are ordinary exceptions (a traceback).
"""


class UserError(Exception):
    """Bad input from the user: a profile, a config, a flag, a checkpoint that does not fit."""

    exit_code = 2


class FieldError(UserError):
    """A UserError about config fields, named as in the config file ('micro_batch: ...'). A CLI that
    took those values as flags names its flags instead: `FieldError.as_flags` rewrites the message."""

    def __init__(self, message: str, fields: tuple[str, ...]) -> None:
        super().__init__(message)
        self.fields = fields

    def as_flags(self, flags: dict[str, str]) -> UserError:
        """The same error with each field this CLI took as a flag named by that flag."""
        import re

        msg = str(self)
        for name in self.fields:
            if name in flags:
                msg = re.sub(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", flags[name], msg)
        return UserError(msg)


class ServiceUnavailable(Exception):
    """A service did not answer (down, timed out, not installed): not the user's input, not a bug."""

    exit_code = 3

    def __init__(self, reason: str, hint: str | None = None) -> None:
        super().__init__(reason if hint is None else f"{reason}; {hint}")
        self.reason = reason  # one clean clause, e.g. "squeue: slurmctld did not answer within 10 s"
        self.hint = hint
