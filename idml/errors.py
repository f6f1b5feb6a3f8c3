"""The one exception type for bad input (arguments, data, checkpoints).

The command line catches it, prints its message (one sentence saying what was expected
where) and exits with code 2; library users can catch it as a ValueError.
"""


class UsageError(ValueError):
    pass


class TrainingDiverged(UsageError):
    """The loss stopped being finite; reported like bad input (one sentence, exit code 2)."""
