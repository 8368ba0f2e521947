"""`--ray` and `miocli.scale.ray` on a real local Ray cluster (loopback, 2 CPUs, tiny checkpoint).

One cluster serves the whole module: `ray start --head --block` in its own session, on free ports,
killed as a process group at the end. Each CLI run joins it with --ray-address, as a user joins a
cluster; two workers hold a model each. No wall-clock assertions: the machine is shared.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mio_testing import MIO_COMMAND, free_port, run_mio

pytest.importorskip("ray.data")
# Each test starts a local Ray cluster (the slowest part of the suite): CI runs them with `pytest -m ci`.
pytestmark = pytest.mark.ci

FAST = ["--max-new-tokens", "8", "--beams", "1"]
COUNT = 16


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A Ray head on loopback; its address."""
    # Ray's socket paths must stay short (a Unix socket path is at most 107 bytes): not under pytest's tmp.
    temp = Path(tempfile.mkdtemp(prefix="mio-ray-", dir="/tmp"))
    ray_script = Path(sys.executable).with_name("ray")
    command = [str(ray_script) if ray_script.exists() else shutil.which("ray") or "ray", "start", "--head", "--block",
               "--node-ip-address=127.0.0.1", "--num-cpus=2", "--object-store-memory=300000000",
               "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats"]
    port = free_port()
    # Every port Ray would otherwise take at a fixed number, so a second cluster on the machine cannot clash.
    for option in ("--port", "--dashboard-agent-listen-port", "--metrics-export-port",
                   "--runtime-env-agent-port", "--dashboard-agent-grpc-port"):
        command.append(f"{option}={port if option == '--port' else free_port()}")
    # Ray turns token authentication on by itself once ~/.ray/auth_token exists (any earlier local
    # `ray.init()` writes one); this loopback cluster and every driver of the module say it explicitly.
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    log = (temp / "head.log").open("w")
    head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    try:
        deadline = time.monotonic() + 180
        while "block forever" not in (temp / "head.log").read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed: {(temp / 'head.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        # The whole group at once: a SIGTERM would drain for 30 s first.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=60)
        log.close()
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(7)
    for n in range(COUNT):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(folder / f"p{n:02d}.png")
    return folder


@pytest.fixture(scope="module")
def local_captions(tiny_model: Path, pictures: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The plain local run every Ray run is compared with: its output folder and its --json stdout."""
    out = tmp_path_factory.mktemp("local") / "out"
    done = run_mio("caption", str(pictures), "--model", str(tiny_model), "--device", "cpu", *FAST, "-b", "2",
                   "--seed", "3", "--json", "-o", str(out))
    assert done.returncode == 0, done.stderr
    return out, done.stdout


def ray_args(cluster: str) -> list[str]:
    return ["--ray-address", cluster, "--workers", "2"]


def outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "manifest.jsonl"}


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def workers_of(root: int) -> list[int]:
    """The pids of the MioWorker actors among the descendants of `root` (Ray titles them ray::…MioWorker…)."""
    children: dict[int, list[int]] = {}
    titles: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            titles[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            todo.append(child)
            if "MioWorker" in titles.get(child, ""):
                found.append(child)
    return found


# ---- the CLI --------------------------------------------------------------------------------------
def test_a_ray_run_writes_what_the_local_run_writes(tiny_model, pictures, local_captions, cluster, tmp_path):
    local_out, local_stdout = local_captions
    out = tmp_path / "out"
    done = run_mio("caption", str(pictures), "--model", str(tiny_model), "--device", "cpu", *FAST, "-b", "2",
                   "--seed", "3", "--json", "-o", str(out), *ray_args(cluster))
    assert done.returncode == 0, done.stderr
    assert done.stdout == local_stdout  # same records, same order
    assert outputs(out) == outputs(local_out)
    assert manifest(out) == manifest(local_out)


def test_images_decoded_on_two_workers_match_the_local_run(tiny_model, cluster, tmp_path):
    """Pixels start from one noise for the whole job, whichever worker decodes them.

    Byte for byte only with as many threads as a worker has (Ray gives a 1-CPU actor OMP_NUM_THREADS=1):
    the diffusion's float sums round differently with another thread count. Texts do not change.
    """
    prompts = ["a red kite", "a blue door", "a green hill", "a white cat"]
    common = ["imagine", *prompts, "--model", str(tiny_model), "--device", "cpu", "--beams", "1", "--steps", "2",
              "--size", "64", "--seed", "11", "-b", "1"]
    local = run_mio(*common, "-o", str(tmp_path / "local"), env={"OMP_NUM_THREADS": "1"})
    remote = run_mio(*common, "-o", str(tmp_path / "ray"), *ray_args(cluster))
    assert local.returncode == 0, local.stderr
    assert remote.returncode == 0, remote.stderr
    assert outputs(tmp_path / "ray") == outputs(tmp_path / "local")
    assert len(outputs(tmp_path / "local")) >= len(prompts)  # the tiny model draws one image or more each


def test_a_worker_killed_mid_job_is_replaced_and_every_output_is_written_once(tiny_model, pictures, local_captions,
                                                                              cluster, tmp_path):
    local_out, _ = local_captions
    out = tmp_path / "out"
    process = subprocess.Popen([*MIO_COMMAND, "caption", str(pictures), "--model", str(tiny_model), "--device", "cpu",
                                *FAST, "-b", "1", "--seed", "3", "--json", "-o", str(out), *ray_args(cluster)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={k: v for k, v in os.environ.items() if k != "MIO_MODEL"})
    assert process.stdout is not None
    first = process.stdout.readline()  # one result written: both workers hold a model and are busy
    assert first, process.stderr.read() if process.stderr else ""
    head = int(cluster_head_pid(cluster))
    victims = workers_of(head)
    assert victims
    os.kill(victims[0], signal.SIGKILL)
    rest, errors = process.communicate(timeout=600)
    assert process.returncode == 0, errors
    assert "raylet" not in rest  # Ray's notices of the death go to stderr, never among the results
    records = [json.loads(line) for line in [first, *rest.splitlines()]]
    assert [r["input"] for r in records] == sorted(str(p) for p in pictures.iterdir())  # each once, in order
    assert [r["input"] for r in manifest(out)] == [r["input"] for r in records]
    # Captions of the retried batch are those of the local run too.
    assert outputs(out) == outputs(local_out)
    assert victims[0] not in workers_of(head)


def cluster_head_pid(address: str) -> int:
    """The `ray start --block` process listening on this address's port (the fixture started it)."""
    port = address.rsplit(":", 1)[1]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--block" in cmdline and f"--port={port}".encode() in cmdline:
                return int(entry.name)
    raise AssertionError("the Ray head is gone")


def test_skip_existing_resumes_a_ray_job(tiny_model, pictures, local_captions, cluster, tmp_path):
    """A folder as a killed job leaves it (some outputs and lines missing) is finished by --skip-existing."""
    local_out, _ = local_captions
    out = tmp_path / "out"
    shutil.copytree(local_out, out)
    lost = sorted(out.glob("*.caption.txt"))[5:9]
    for path in lost:
        path.unlink()
    kept = [line for line in (out / "manifest.jsonl").read_text().splitlines()
            if not any(path.name in line for path in lost)]
    (out / "manifest.jsonl").write_text("\n".join(kept) + "\n")
    done = run_mio("caption", str(pictures), "--model", str(tiny_model), "--device", "cpu", *FAST, "-b", "2",
                   "--seed", "3", "-o", str(out), "--skip-existing", *ray_args(cluster))
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("its output exists") == COUNT - len(lost)
    assert outputs(out) == outputs(local_out)
    assert sorted(r["input"] for r in manifest(out)) == sorted(r["input"] for r in manifest(local_out))


def test_a_model_problem_on_the_workers_ends_the_job_with_exit_3(pictures, cluster, tmp_path):
    missing = tmp_path / "no-model"
    local = run_mio("caption", str(pictures / "p00.png"), "--model", str(missing), "--device", "cpu")
    remote = run_mio("caption", str(pictures / "p00.png"), "--model", str(missing), "--device", "cpu",
                     *ray_args(cluster))
    assert local.returncode == remote.returncode == 3
    error = next(line for line in local.stderr.splitlines() if line.startswith("mio: error:"))
    assert error in remote.stderr.splitlines()


# ---- the Python API -------------------------------------------------------------------------------
def test_map_task_returns_result_rows_and_a_bad_input_is_its_rows_error(tiny_model, pictures, local_captions,
                                                                       cluster):
    import ray

    from miocli.scale.ray import map_task, to_result

    local_out, _ = local_captions
    expected = {r["input"]: r["text"] for r in manifest(local_out)}
    paths = sorted(str(p) for p in pictures.iterdir())[:4]
    ray.init(address=cluster, logging_level="WARNING", log_to_driver=False)
    try:
        dataset = ray.data.from_items([{"path": p} for p in paths] + [{"path": str(pictures / "missing.png")}])
        rows = map_task(dataset, "caption", model=str(tiny_model), device="cpu", workers=1, batch_size=2, seed=3,
                        max_new_tokens=8, beams=1).take_all()
    finally:
        ray.shutdown()
    by_input = {row["input"]: row for row in rows}
    assert len(rows) == len(paths) + 1
    for path in paths:
        assert by_input[path]["error"] == ""
        assert by_input[path]["text"] == expected[path] == to_result(by_input[path]).text
    bad = by_input[str(pictures / "missing.png")]
    assert bad["error"] and to_result(bad).error is not None
