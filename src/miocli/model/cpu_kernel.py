"""mio's own 4-bit CPU kernels (q4_cpu.cpp), compiled on first use for the machine it runs on.

Why our own: at one row torch's `_weight_int4pack_mm_for_cpu` reads about 18 GB/s of weights on 2 cores that
can read 45 GB/s, and it costs the same for every further row; llama.cpp is faster by taking int8 activations
and integer dot products, which is what q4_cpu.cpp does (AVX-512 VNNI where the CPU has it).

The library is built with the system's C++ compiler against the installed torch, with `-march=native`, once per
source, torch version and CPU (a quarter of a minute), into `$MIO_CACHE/kernels/` (or `$MIO_KERNEL_CACHE`).
Without a compiler, or with `MIO_CPU_KERNEL=0`, 4-bit layers keep torch's kernel; `mio doctor` says which is used
and why.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("q4_cpu.cpp")
ENV = "MIO_CPU_KERNEL"
FOLDER_ENV = "MIO_KERNEL_CACHE"
COMPILE_TIMEOUT_S = 600
_why_not: list[str] = []


def _cpu_fingerprint() -> str:
    """What `-march=native` depends on: the model and flags of the CPU (a cache shared between machines must not
    hand one a library with instructions it lacks)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = [line for line in lines if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(wanted)))


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def library_path(compiler: str) -> Path:
    from miocli.model.tiny import default_cache_dir

    key = "\n".join([SOURCE.read_text(), torch.__version__, compiler, _cpu_fingerprint(), sys.version])
    folder = Path(os.environ[FOLDER_ENV]) if os.environ.get(FOLDER_ENV) else default_cache_dir() / "kernels"
    return folder / f"mio_q4-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def compile_command(compiler: str, output: Path) -> list[str]:
    from torch.utils import cpp_extension

    torch_lib = Path(torch.__file__).parent / "lib"
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes, str(SOURCE), "-o", str(output),
            f"-L{torch_lib}", "-ltorch", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{torch_lib}"]


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        print(f"mio: building the 4-bit CPU kernel for this machine (once, a quarter of a minute) in {target.parent}",
              file=sys.stderr)
        done = subprocess.run(compile_command(compiler, temporary), capture_output=True, text=True,
                              timeout=COMPILE_TIMEOUT_S)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"{Path(compiler).name} failed: {last}")
        os.replace(temporary, target)  # another process building the same file at once is harmless
    finally:
        temporary.unlink(missing_ok=True)


def _obstacle() -> str | None:
    """What keeps the kernel from being built here, before trying."""
    if os.environ.get(ENV, "1").lower() in ("0", "off", "no", "false"):
        return f"{ENV}=0"
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        return f"built for x86-64 Linux only, this is {sys.platform} {platform.machine()}"
    if _compiler() is None:
        return "no C++ compiler (g++) on the PATH"
    return None


@functools.cache
def available() -> bool:
    """Whether torch.ops.mio_q4 is loaded (building it if need be); the reason it is not is in why_not()."""
    obstacle = _obstacle()
    if obstacle is not None:
        _why_not.append(obstacle)
        return False
    compiler = _compiler()
    assert compiler is not None
    try:
        target = library_path(compiler)
        if not target.is_file():
            _build(compiler, target)
        torch.ops.load_library(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        _why_not.append(f"could not build it: {exc}")
        return False
    return True


def status() -> dict[str, object]:
    """For `mio doctor`, without building anything: whether the kernel is built here, else whether it can be."""
    obstacle = _obstacle()
    compiler = _compiler()
    if obstacle is not None or compiler is None:
        return {"usable": False, "built": False, "problem": obstacle}
    path = library_path(compiler)
    return {"usable": True, "built": path.is_file(), "path": str(path), "problem": None}


def why_not() -> str | None:
    """Why the kernel is not used, after available() said so."""
    return _why_not[-1] if _why_not else None


def vnni() -> bool:
    """Whether the kernel was built with its AVX-512 VNNI path (else a portable loop the compiler vectorizes)."""
    return available() and bool(torch.ops.mio_q4.vnni())


def linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
           group: int) -> torch.Tensor:
    return torch.ops.mio_q4.linear(x, packed, scales, mins, group)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group: int,
               out: torch.Tensor) -> None:
    torch.ops.mio_q4.dequantize(packed, scales, mins, group, out)
