"""The one exception type for bad input (arguments, data, checkpoints), and the words for
a file that torch.load refuses.

The command line catches it, prints its message (one sentence saying what was expected
where) and exits with code 2; library users can catch it as a ValueError.
"""
import os
import pickle


class UsageError(ValueError):
    pass


class TrainingDiverged(UsageError):
    """The loss stopped being finite; reported like bad input (one sentence, exit code 2)."""


def require_file(path: str, expected: str) -> None:
    """UsageError unless `path` is a file: `expected` (what the option takes), then why."""
    if not os.path.isfile(path):
        raise UsageError(f"{expected}; {path} {'is a folder' if os.path.isdir(path) else 'does not exist'}")


def torch_load_failure(error: Exception) -> str:
    """Why torch.load refused a file, in words that do not advise weights_only=False."""
    message = str(error)
    if "TorchScript" in message:
        return "it is a TorchScript module, such as scripts/export.py writes"
    if "zip archive" in message:
        return "the file is truncated or damaged"
    if isinstance(error, pickle.UnpicklingError):
        return "it is not a plain torch.save file of tensors and values, so it is not loaded"
    return "it is not a file that torch.save wrote"
