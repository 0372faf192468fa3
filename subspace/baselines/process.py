"""What both peers' drivers need to run a peer as its own process: a clean environment and a sure stop."""

from __future__ import annotations

import os
import signal
import subprocess

# what would make the peer's Python import this project's packages, or colour its output
DROPPED = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "FORCE_COLOR", "CLICOLOR_FORCE"}
PLAIN_OFFLINE = dict(PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8", COLUMNS="1000", NO_COLOR="1",
                     HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def peer_env(own_prefix: str, **extra: str) -> dict[str, str]:
    """This environment less what would steer the peer (its `own_prefix*` variables) or its Python, plus offline mode
    and plain output, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in DROPPED and not k.startswith(own_prefix)}
    return env | PLAIN_OFFLINE | extra


def stop(proc: subprocess.Popen) -> None:
    """Ends the peer's whole process group: SIGTERM, then SIGKILL."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
