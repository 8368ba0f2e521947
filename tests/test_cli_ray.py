"""`--ray` without a cluster: the missing extra and contradicting options are one clear line each."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mio_testing import free_port, run_mio


def test_without_the_extra_ray_exits_3_naming_it(tmp_path):
    picture = tmp_path / "p.png"
    picture.write_bytes(b"")
    # sys.modules[name] = None is how Python spells "this module cannot be imported".
    code = ("import sys; sys.modules['ray'] = None\n"
            "from miocli.cli.app import main\n"
            f"main(['caption', {str(picture)!r}, '--ray'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert "pip install 'miocli[ray]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_ray_and_server_together_are_a_usage_error(tmp_path):
    done = run_mio("caption", str(tmp_path / "p.png"), "--ray", "--server", "http://127.0.0.1:9")
    assert done.returncode == 2
    assert "--ray and --server" in done.stderr


def test_workers_must_be_at_least_one(tmp_path):
    done = run_mio("tts", "hello", "-o", str(tmp_path), "--ray", "--workers", "0")
    assert done.returncode == 2
    assert "--workers must be at least 1" in done.stderr


def test_the_ray_options_are_on_the_batch_commands_help():
    done = run_mio("caption", "--help")
    assert "--ray-address" in done.stdout and "--workers" in done.stdout and "--gpus-per-worker" in done.stdout


def test_an_address_nobody_answers_on_is_one_clear_error(tmp_path):
    pytest.importorskip("ray.data")
    picture = tmp_path / "p.png"
    picture.write_bytes(b"")
    address = f"127.0.0.1:{free_port()}"
    done = run_mio("caption", str(picture), "--ray-address", address, timeout=120)
    assert done.returncode == 3
    assert f"cannot reach the Ray cluster at {address}" in done.stderr
