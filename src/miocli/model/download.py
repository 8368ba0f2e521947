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


def cached_models() -> list[dict[str, object]]:
    """The MIO models on this machine: hub snapshots in the HF cache and the tiny checkpoints in $MIO_CACHE.

    Each is {"id", "variant", "size_bytes", "path"}; `id` is what `--model` takes. Only MIO's own hub
    repositories are listed (the cache holds other projects' models too).
    """
    from miocli.model.tiny import default_cache_dir

    found: list[dict[str, object]] = []
    for repo_id in checkpoint.HUB_IDS.values():
        snapshot = checkpoint.cached_snapshot(repo_id)
        if snapshot is not None:
            found.append(_entry(repo_id, snapshot))
    cache = default_cache_dir()
    for folder in sorted(cache.glob("tiny-*-v*")) if cache.is_dir() else []:
        if (folder / "config.json").is_file():
            # `--model tiny` is the Instruct one; the others are older formats or the base variant.
            name = checkpoint.TINY if folder.name.startswith("tiny-instruct-") else str(folder)
            found.append(_entry(name, folder))
    return found


def _entry(model_id: str, folder: Path) -> dict[str, object]:
    try:
        variant = checkpoint.detect_variant(folder)
    except Exception:  # a folder without a readable config still shows, its variant unknown
        variant = "?"
    return {"id": model_id, "variant": variant, "size_bytes": _size(folder), "path": str(folder)}


def _size(folder: Path) -> int:
    """Bytes of the files a folder holds, following the hub cache's links to its blobs once each."""
    seen: set[Path] = set()
    total = 0
    for path in folder.rglob("*"):
        try:
            real = path.resolve()
            if real in seen or not real.is_file():
                continue
            seen.add(real)
            total += real.stat().st_size
        except OSError:
            continue
    return total


def human_size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"
