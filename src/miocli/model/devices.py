"""Where and how the model runs: the user's runtime options and the device, dtype and quantization they mean.

Cheap checks of the option values come first (`validate_options`, before anything heavy is
imported); the choices themselves (`resolve_device`, `resolve_dtype`, `resolve_quantize`) need torch.
bitsandbytes' known noise is filtered here, since whether it can run is part of the quantization choice.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from miocli.errors import EnvironmentProblem, UsageError
from miocli.model import checkpoint, memory

if TYPE_CHECKING:
    import torch

    from miocli.model.memory import LlmSize

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE_MODES = ("auto", "none", "8bit", "4bit")
# fp16 weights of the 7B LLM plus room for activations and the KV cache.
LLM_FP16_BYTES = 7_000_000_000 * 2
HEADROOM = 1.25


@dataclass
class RuntimeOptions:
    model: str | None = None
    variant: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    quantize: str = "auto"
    verbose: bool = False
    # What runs the LLM (miocli.engines): "transformers" here, "vllm" in-process, or a `vllm serve` at engine_url.
    engine: str = "transformers"
    engine_url: str | None = None


def validate_options(options: RuntimeOptions) -> None:
    """Cheap checks of option values, done before anything heavy is imported."""
    device = options.device.lower()
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise UsageError(f"unknown device {options.device!r}", hint=f"use {DEVICE_CHOICES}")
    if options.dtype not in DTYPES:
        raise UsageError(f"unknown dtype {options.dtype!r}", hint=f"use one of {', '.join(DTYPES)}")
    if options.quantize not in QUANTIZE_MODES:
        raise UsageError(f"unknown quantize mode {options.quantize!r}", hint=f"use one of {', '.join(QUANTIZE_MODES)}")
    if options.variant is not None and options.variant.lower() not in checkpoint.VARIANTS:
        raise UsageError(f"unknown variant {options.variant!r}", hint="use instruct or base")


def resolve_device(spec: str) -> torch.device:
    import torch

    spec = spec.lower()
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise EnvironmentProblem(f"--device {spec} was asked for but CUDA is not available here",
                                 hint="use --device cpu (or auto)")
    device = torch.device("cuda:0" if spec == "cuda" else spec)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise EnvironmentProblem(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here",
                                 hint="pick an index below that")
    return device


def resolve_dtype(spec: str, device: torch.device, llm: LlmSize | None = None, free: int | None = None) -> torch.dtype:
    """The LLM's dtype. auto: bf16 (or fp16) on CUDA; on the CPU see `cpu_auto_dtype`."""
    import torch

    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return cpu_auto_dtype(llm, free)
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec]


# Below this the float32 LLM is cheap and stays reference-exact (the tiny test checkpoints, small models).
BF16_FROM_PARAMETERS = 1_000_000_000


def cpu_auto_dtype(llm: LlmSize | None, free: int | None) -> torch.dtype:
    """float32 for small LLMs (exact, cheap); bfloat16 for a large one when the CPU computes bf16 natively
    (AVX512-BF16 or AMX: half the memory and faster, docs/performance.md), or when float32 would not fit."""
    import torch

    if llm is None:
        return torch.float32
    if llm.parameters >= BF16_FROM_PARAMETERS and cpu_has_bf16():
        return torch.bfloat16
    if free and memory.llm_bytes(llm, "float32", "none") > free >= memory.llm_bytes(llm, "bfloat16", "none"):
        return torch.bfloat16
    return torch.float32


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX-BF16)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_quantize(spec: str, device: torch.device, weight_bytes: int = LLM_FP16_BYTES) -> str:
    """'none', '8bit' or '4bit'. auto: 4-bit on a CUDA device too small for fp16 weights."""
    if spec == "auto":
        if device.type != "cuda":
            return "none"
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return "4bit" if free < weight_bytes * HEADROOM else "none"
    if spec in ("8bit", "4bit") and device.type != "cpu":
        # The CPU has its own weight-only path (miocli.model.quantize); bitsandbytes is for CUDA.
        problem = bitsandbytes_problem(device)
        if problem:
            raise EnvironmentProblem(f"--quantize {spec} needs bitsandbytes, which cannot run here: {problem}",
                                     hint="install bitsandbytes>=0.45 or use --quantize none")
    return spec


def bitsandbytes_problem(device: torch.device | None = None) -> str | None:
    """Why bitsandbytes cannot quantize here, or None when it can."""
    quiet_bitsandbytes()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes  # noqa: F401
    except Exception as exc:  # a broken native library raises all sorts of errors
        return f"{exc.__class__.__name__}: {exc}"
    return None


# Exactly the bitsandbytes messages that are noise for mio, by logger: the int8 path warns on every
# matmul that it casts bfloat16 inputs to float16 (thousands of lines per answer on CPU), and the
# import logs that an optional CPU kernel package is absent. Everything else it says gets through.
_BITSANDBYTES_NOISE = {
    "bitsandbytes.autograd._functions": r"MatMul8bitLt: inputs will be cast from",
    "bitsandbytes.backends.cpu.ops": r"Failed to load CPU gemm_4bit_forward from kernels-community",
}


class _DropMessages(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def quiet_bitsandbytes() -> None:
    """Silence the known bitsandbytes noise before it is imported or quantizes (safe to call again)."""
    # Older releases send the cast notice through warnings instead of logging.
    warnings.filterwarnings("ignore", message=_BITSANDBYTES_NOISE["bitsandbytes.autograd._functions"])
    for name, pattern in _BITSANDBYTES_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(pattern))


def llm_compute_dtype(dtype: torch.dtype, quantize: str) -> torch.dtype:
    """The dtype the LLM really computes in: quantized weights never compute in float32 (bfloat16 then)."""
    import torch

    if quantize in ("8bit", "4bit") and dtype == torch.float32:
        return torch.bfloat16
    return dtype
