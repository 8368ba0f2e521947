"""`mio download`: fetch MIO weights into the Hugging Face cache, only when asked."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from miocli.errors import EnvironmentProblem, UsageError
from miocli.model import checkpoint

# A day: the hub either answers long before, or not at all.
MAX_TIMEOUT = 86400


def hub_reachable(endpoint: str, timeout: float) -> str | None:
    """None when a TCP connection to the hub opens in time, else why not."""
    parsed = urlparse(endpoint)
    host = parsed.hostname or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{exc.__class__.__name__}: {exc}"


def download_model(variant: str, *, revision: str | None = None, timeout: float = 10.0) -> Path:
    variant = variant.lower()
    if variant not in checkpoint.HUB_IDS:
        raise UsageError(f"--variant {variant} is not one of instruct, base")
    # The socket refuses a negative timeout and overflows on a huge one: say so before trying.
    if not (math.isfinite(timeout) and 0 < timeout <= MAX_TIMEOUT):
        raise UsageError(f"--timeout must be a number of seconds above 0 and at most {MAX_TIMEOUT}, not {timeout}")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise EnvironmentProblem("HF_HUB_OFFLINE=1 is set, so nothing can be downloaded",
                                 hint="unset it, or copy the model folder here and pass --model PATH")
    repo_id = checkpoint.HUB_IDS[variant]
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(timeout)))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(timeout)))
    from huggingface_hub import constants, snapshot_download

    # A quick connection test turns an offline machine into one clear message in seconds,
    # instead of retries inside the hub client.
    problem = hub_reachable(constants.ENDPOINT, timeout)
    if problem:
        raise EnvironmentProblem(
            f"cannot reach the Hugging Face hub to download {repo_id} ({problem})",
            hint="check the network or proxy settings; on an offline machine copy the model folder over and "
            "pass --model PATH",
        )
    try:
        path = snapshot_download(repo_id, revision=revision)
    except Exception as exc:  # the hub client raises many kinds; all mean the same to the user
        raise EnvironmentProblem(f"downloading {repo_id} failed: {exc.__class__.__name__}: {exc}".splitlines()[0],
                                 hint="run `mio download` again to resume") from exc
    return Path(path)
