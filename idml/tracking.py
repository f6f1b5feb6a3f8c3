"""wandb logging, imported lazily so that wandb stays optional.

The mode is the stricter of --wandb and the environment's WANDB_MODE (disabled > offline >
online; WANDB_DISABLED=true counts as disabled): disabled starts no wandb process and writes
nothing. --wandb auto (with no WANDB_MODE): online when credentials exist (WANDB_API_KEY or a
netrc entry) and the server answers within seconds, else offline (the run is written under
the run folder and can be uploaded with `wandb sync`). The other WANDB_* variables the user
set (WANDB_PROJECT, WANDB_DIR, WANDB_RUN_ID, WANDB_RESUME, ...) are left to wandb, never
overridden by this project's defaults.
"""

import os
import socket
import urllib.parse
import warnings

from idml.errors import UsageError

STRICTNESS = ("online", "offline", "disabled")  # each stricter than the ones before it
ENV_MODES = {"dryrun": "offline", "run": "online"}  # wandb's older names
PROBE_SECONDS = 3.0  # to reach the server's port, before wandb.init (whose own default wait is 90 s)
INIT_SECONDS = 20.0  # for wandb.init online under --wandb auto, before falling back to offline


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.expanduser("~/.netrc")
    return os.path.isfile(netrc) and "api.wandb.ai" in open(netrc).read()


def resolve_mode(flag: str, env=os.environ) -> str:
    """The stricter of --wandb `flag` and WANDB_MODE; "auto" when neither decides."""
    env_mode = env.get("WANDB_MODE", "").strip().lower()
    env_mode = ENV_MODES.get(env_mode, env_mode)
    if env.get("WANDB_DISABLED", "").strip().lower() in ("true", "1", "yes"):
        env_mode = "disabled"
    modes = [mode for mode in (flag, env_mode) if mode in STRICTNESS]
    return max(modes, key=STRICTNESS.index) if modes else "auto"


def server_reachable(env=os.environ, timeout: float = PROBE_SECONDS) -> bool:
    """Whether a TCP connection to wandb's server (WANDB_BASE_URL) opens within `timeout`."""
    url = urllib.parse.urlsplit(env.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def open_run(mode: str, project: str, run_dir: str, config: dict, run_id: str | None = None):
    """A wandb run, or None when disabled (or auto without wandb installed)."""
    flag, mode = mode, resolve_mode(mode)
    if mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        if mode == "auto":
            warnings.warn(
                "wandb is not installed, so this run is not logged to wandb (pip install wandb)", stacklevel=2
            )
            return None
        raise UsageError(
            f"--wandb {mode} needs the wandb package: pip install wandb, or pass --wandb disabled"
        ) from None
    env = os.environ
    options = {"config": config}
    for variable, name, value in (
        ("WANDB_PROJECT", "project", project),
        ("WANDB_DIR", "dir", run_dir),
        ("WANDB_RUN_ID", "id", run_id),
        ("WANDB_RESUME", "resume", "allow"),
    ):
        if not env.get(variable):
            options[name] = value
    auto = mode == "auto"
    if auto:
        mode = "online" if _has_credentials() else "offline"
        if mode == "online" and not server_reachable():
            _offline_note("its server cannot be reached")
            mode = "offline"
    settings = {"silent": True, **({"init_timeout": INIT_SECONDS} if auto and mode == "online" else {})}
    try:
        return wandb.init(mode=mode, settings=wandb.Settings(**settings), **options)
    except wandb.errors.Error as error:  # no credentials, no network, a bad run id
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if auto and mode == "online":
            _offline_note(f"it could not start the run online ({reason})")
            return wandb.init(mode="offline", settings=wandb.Settings(silent=True), **options)
        raise UsageError(
            f"--wandb {mode if flag == mode else f'{flag} (WANDB_MODE {mode})'}: wandb could not start "
            f"the run ({reason}); --wandb offline logs into the run folder for a later `wandb sync`"
        ) from None


def _offline_note(why: str) -> None:
    print(f"note: --wandb auto: logging to wandb offline, as {why}; upload later with `wandb sync`", flush=True)
