"""Device, dtype and quantization choice, and lazy per-component loading.

A `Runtime` holds the model folder and the user's choices; each component (tokenizer, LLM,
image codec, speech codec, unCLIP pipeline) is loaded the first time a task asks for it,
so a command pays only for what its task needs. Every load is timed and its memory noted
for `--verbose`.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from miocli import checkpoint
from miocli.errors import EnvironmentProblem, ModelError, UsageError

if TYPE_CHECKING:
    import torch

    from miocli.tokenizer import MioTokenizer

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


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    import torch

    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec]


def resolve_quantize(spec: str, device: torch.device, weight_bytes: int = LLM_FP16_BYTES) -> str:
    """'none', '8bit' or '4bit'. auto: 4-bit on a CUDA device too small for fp16 weights."""
    if spec == "auto":
        if device.type != "cuda":
            return "none"
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return "4bit" if free < weight_bytes * HEADROOM else "none"
    if spec in ("8bit", "4bit"):
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


_FREEZE_AT_EXIT: list[bool] = []


def freeze_objects_at_exit() -> None:
    """At exit, skip the interpreter's last garbage collection over what torch and the models created.

    That pass walks every object (hundreds of thousands after `import torch`) only to free memory the
    OS takes back anyway: about 0.25 s of a 3 s `mio tokenize` (benchmarks/speech.py). gc.freeze() in
    an exit handler moves them out of its reach; other exit handlers still run and objects still go
    when their last reference does. Registered once per process.
    """
    if not _FREEZE_AT_EXIT:
        import atexit
        import gc

        atexit.register(gc.freeze)
        _FREEZE_AT_EXIT.append(True)


def memory_in_use() -> int:
    """Resident memory of this process in bytes."""
    try:
        # Linux: the number psutil reports, without importing psutil (~10 ms) in every command that loads.
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass
class LoadRecord:
    component: str
    seconds: float
    rss_delta_bytes: int
    parameters: int
    detail: str = ""
    # parameters per top-level module (e.g. seed: visual_encoder, Qformer, quantize; unclip: unet, vae, ...)
    breakdown: dict[str, int] = field(default_factory=dict)


@dataclass
class Runtime:
    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    _model_dir: Path | None = None
    _components: dict[str, Any] = field(default_factory=dict)
    loads: list[LoadRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        validate_options(self.options)
        freeze_objects_at_exit()

    # ---- where and how ---------------------------------------------------------------------
    @property
    def model_dir(self) -> Path:
        if self._model_dir is None:
            self._model_dir = checkpoint.resolve_model(self.options.model)
        return self._model_dir

    @property
    def variant(self) -> str:
        if "variant" not in self._components:
            self._components["variant"] = checkpoint.detect_variant(self.model_dir, self.options.variant)
        return self._components["variant"]

    @property
    def device(self) -> torch.device:
        if "device" not in self._components:
            self._components["device"] = resolve_device(self.options.device)
        return self._components["device"]

    @property
    def dtype(self) -> torch.dtype:
        if "dtype" not in self._components:
            self._components["dtype"] = resolve_dtype(self.options.dtype, self.device)
        return self._components["dtype"]

    def log(self, message: str) -> None:
        if self.options.verbose:
            print(f"mio: {message}", file=sys.stderr)

    def _timed_load(self, name: str, loader: Any, detail: str = "") -> Any:
        rss_before = memory_in_use()
        start = time.perf_counter()
        component = loader()
        seconds = time.perf_counter() - start
        parameters = _count_parameters(component)
        record = LoadRecord(name, seconds, memory_in_use() - rss_before, parameters, detail,
                            _parameter_breakdown(component))
        self.loads.append(record)
        self.log(
            f"loaded {name}{f' ({detail})' if detail else ''} in {seconds:.2f} s, "
            f"{parameters / 1e6:.1f} M parameters, +{record.rss_delta_bytes / 2**20:.0f} MiB resident"
        )
        if record.breakdown:
            self.log(f"  {name} parameters: " + ", ".join(f"{k} {v:,}" for k, v in record.breakdown.items()))
        return component

    # ---- components ------------------------------------------------------------------------
    @property
    def tokenizer(self) -> MioTokenizer:
        if "tokenizer" not in self._components:
            from miocli.tokenizer import MioTokenizer

            checkpoint.require_components(self.model_dir, [checkpoint.LLM])
            self._components["tokenizer"] = self._timed_load(
                "tokenizer", lambda: MioTokenizer.from_dir(self.model_dir)
            )
        return self._components["tokenizer"]

    @property
    def llm(self) -> Any:
        if "llm" not in self._components:
            checkpoint.require_components(self.model_dir, [checkpoint.LLM])
            quantize = resolve_quantize(self.options.quantize, self.device)
            self._components["llm"] = self._timed_load(
                "llm", lambda: load_llm(self.model_dir, self.device, self.dtype, quantize),
                detail=f"{self.device}, {str(llm_compute_dtype(self.dtype, quantize)).replace('torch.', '')}, "
                f"quantize={quantize}",
            )
        return self._components["llm"]

    def _codec(self, name: str, component: str, parts: frozenset[str], loader: Any) -> Any:
        """Load a codec once with the parts asked for; a later, larger request reloads it."""
        cached = self._components.get(name)
        if cached is not None and parts <= cached[0]:
            return cached[1]
        checkpoint.require_components(self.model_dir, [component])
        wanted = parts | (cached[0] if cached is not None else frozenset())
        codec = self._timed_load(name, lambda: loader(wanted), detail="+".join(sorted(wanted)))
        self._components[name] = (wanted, codec)
        return codec

    def seed_codec(self, parts: frozenset[str]) -> Any:
        """The SEED image tokenizer: 'encoder' for image input, 'decoder' for image output."""
        from miocli.codecs.seed import SeedCodec

        # fp16 on GPU like the reference; fp32 on CPU where half precision is slow.
        dtype = self.dtype if self.device.type == "cuda" else self.cpu_codec_dtype()
        return self._codec("seed", checkpoint.SEED, parts, lambda wanted: SeedCodec.load(
            self.model_dir / "seed-tokenizer-2", device=self.device, dtype=dtype, parts=wanted))

    def speech_codec(self, parts: frozenset[str]) -> Any:
        """SpeechTokenizer: 'encoder' for speech input, 'decoder' for speech output (always fp32)."""
        import torch

        from miocli.codecs.speech import SpeechCodec

        return self._codec("speech", checkpoint.SPEECH, parts, lambda wanted: SpeechCodec.load(
            self.model_dir / "SpeechTokenizer", device=self.device, dtype=torch.float32, parts=wanted))

    @property
    def unclip(self) -> Any:
        if "unclip" not in self._components:
            from miocli.codecs.seed.unclip import UnclipDecoder

            checkpoint.require_components(self.model_dir, [checkpoint.UNCLIP])
            self._components["unclip"] = self._timed_load("unclip", lambda: UnclipDecoder.load(
                self.model_dir / "stable-diffusion-2-1-unclip", device=self.device, dtype=self.dtype))
        return self._components["unclip"]

    def cpu_codec_dtype(self) -> torch.dtype:
        import torch

        return self.dtype if self.options.dtype != "auto" else torch.float32

    def loaded(self) -> list[str]:
        return [r.component for r in self.loads]


def _count_parameters(component: Any) -> int:
    counter = getattr(component, "num_parameters", None)
    if callable(counter):
        try:
            return int(counter())
        except TypeError:
            pass
    parameters = getattr(component, "parameters", None)
    if callable(parameters):
        return sum(p.numel() for p in parameters())
    return 0


def _parameter_breakdown(component: Any) -> dict[str, int]:
    """Parameters per top-level module of a loaded component, largest first ({} when it holds no modules)."""
    pipeline = getattr(component, "pipeline", None)
    if pipeline is not None and isinstance(getattr(pipeline, "components", None), dict):  # diffusers pipeline
        counts = {name: sum(p.numel() for p in module.parameters())
                  for name, module in pipeline.components.items() if callable(getattr(module, "parameters", None))}
    else:
        module = next((m for m in (component, getattr(component, "model", None), getattr(component, "net", None))
                       if callable(getattr(m, "named_parameters", None))), None)
        if module is None:
            return {}
        counts = {}
        for name, parameter in module.named_parameters():
            top = name.split(".", 1)[0]
            counts[top] = counts.get(top, 0) + parameter.numel()
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def load_llm(model_dir: Path, device: torch.device, dtype: torch.dtype, quantize: str) -> Any:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    kwargs: dict[str, Any] = {"local_files_only": True}
    if quantize in ("8bit", "4bit"):
        from transformers import BitsAndBytesConfig

        quiet_bitsandbytes()
        compute = llm_compute_dtype(dtype, quantize)
        if quantize == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        dtype = compute
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=dtype, device_map={"": str(device)}, **kwargs
            )
    except Exception as exc:  # truncated or corrupt weight files raise library-specific errors
        raise ModelError(f"cannot load the LLM from {model_dir}: {exc.__class__.__name__}: {exc}".splitlines()[0],
                         hint="check the folder with `mio doctor`; re-download incomplete files") from exc
    model.eval()
    return model
