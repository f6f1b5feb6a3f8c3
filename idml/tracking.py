"""wandb logging, imported lazily so that wandb stays optional.

--wandb auto: online when credentials exist (WANDB_API_KEY or a netrc entry), else
offline (the run is written under the run folder and can be uploaded with `wandb sync`).
"""
import os
import warnings
from typing import Optional

from idml.errors import UsageError


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.expanduser("~/.netrc")
    return os.path.isfile(netrc) and "api.wandb.ai" in open(netrc).read()


def open_run(mode: str, project: str, run_dir: str, config: dict, run_id: Optional[str] = None):
    """A wandb run, or None when disabled (or auto without wandb installed)."""
    if mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        if mode == "auto":
            warnings.warn("wandb is not installed, so this run is not logged to wandb (pip install wandb)", stacklevel=2)
            return None
        raise UsageError(f"--wandb {mode} needs the wandb package: pip install wandb, or pass --wandb disabled") from None
    if mode == "auto":
        mode = "online" if _has_credentials() else "offline"
    try:
        return wandb.init(project=project, dir=run_dir, config=config, mode=mode, id=run_id, resume="allow",
                          settings=wandb.Settings(silent=True))
    except wandb.errors.Error as error:  # no credentials, no network, a bad run id
        raise UsageError(f"--wandb {mode}: wandb could not start the run ({str(error).splitlines()[0]}); "
                         f"--wandb offline logs into the run folder for a later `wandb sync`") from None
