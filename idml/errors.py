"""The exception types the command lines turn into one sentence and an exit code, and the
words for a file that torch.load refuses. Torch-free, so that --help stays fast.

UsageError (bad input: arguments, data, checkpoints): exit code 2; library users can catch
it as a ValueError. TrainingDiverged: exit code 3. Interrupted: 128 + the signal's number.
"""

import os
import pickle
import signal


class UsageError(ValueError):
    pass


class TrainingDiverged(Exception):
    """The loss or the weights stopped being finite: one sentence naming a checkpoint that is
    still good (exit code 3, apart from bad input's 2)."""


class Interrupted(Exception):
    """SIGTERM or SIGINT stopped the run after a step; checkpoint_last.pt holds that step."""

    def __init__(self, signal_number: int, checkpoint: str, epoch: int, step: int):
        self.signal_number, self.checkpoint = signal_number, checkpoint
        super().__init__(
            f"stopped by {signal.Signals(signal_number).name} after epoch {epoch + 1}, step {step}; "
            f"{checkpoint} holds that step: continue with the same command plus --resume {checkpoint}"
        )


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
