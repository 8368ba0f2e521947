"""Device, dtype and quantization choice, and lazy per-component loading.

A `Runtime` holds the model folder and the user's choices; each component (tokenizer, LLM,
image codec, speech codec, unCLIP pipeline) is loaded the first time a task asks for it,
so a command pays only for what its task needs. Every load is timed and its memory noted
for `--verbose`.

Loading never trusts the folder: no library may run code shipped with a model, read stdin or
write to stdout, and a component that fails to load fails the same way, at once, every time it
is asked for again (one error for a run, not one per input).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from miocli import checkpoint, memory, protocol
from miocli.errors import EnvironmentProblem, ModelError, UsageError

if TYPE_CHECKING:
    import torch

    from miocli.memory import LlmSize
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
        # The CPU has its own weight-only path (miocli.quantize); bitsandbytes is for CUDA.
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
    # (component, parts) -> the ModelError its load raised: broken files are not read again.
    _failures: dict[tuple[str, frozenset[str]], ModelError] = field(default_factory=dict)
    # Components whose folder checks passed (Runtime.require).
    _checked: set[str] = field(default_factory=set)
    # A server or a worker keeps what fits; a one-shot command also releases what it no longer needs
    # once memory is tight, so its peak is its largest phase (miocli.memory).
    long_lived: bool = False
    # Estimated resident bytes of each loaded model component, and those a step is using right now.
    _held: dict[str, int] = field(default_factory=dict)
    _in_use: dict[str, int] = field(default_factory=dict)
    released: list[str] = field(default_factory=list)

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
            size = free = None
            if self.options.dtype == "auto" and self.device.type == "cpu":
                config = memory.llm_config(self.model_dir)
                size = memory.llm_size(config) if config is not None else None
                free = self.budget().free
            self._components["dtype"] = resolve_dtype(self.options.dtype, self.device, size, free)
        return self._components["dtype"]

    # ---- memory ----------------------------------------------------------------------------------
    def budget(self) -> memory.Budget:
        """What is free for the next component (MIO_MEMORY_LIMIT caps it, less what is loaded)."""
        free, total = memory.free_memory(self.device)
        cap = memory.limit()
        if cap is not None:
            free = min(free, max(0, cap - sum(self._held.values()))) if total else cap - sum(self._held.values())
            total = min(total, cap) if total else cap
        where = "RAM" if self.device.type == "cpu" else f"{self.device} VRAM"
        return memory.Budget(max(0, free), total, where)

    @contextlib.contextmanager
    def using(self, *names: str) -> Iterator[None]:
        """Marks components a step is using: making room for another never releases them meanwhile."""
        for name in names:
            self._in_use[name] = self._in_use.get(name, 0) + 1
        try:
            yield
        finally:
            for name in names:
                self._in_use[name] -= 1
                if not self._in_use[name]:
                    del self._in_use[name]

    def make_room(self, name: str, need: int, what: str, choices: Iterable[memory.Choice] = ()) -> None:
        """Before loading `name` (about `need` bytes): release what the step does not use when memory is
        tight, and refuse (exit 3, naming what fits) when it cannot fit at all."""
        budget = self.budget()
        if not budget.total:
            return  # this platform does not say: nothing to decide on
        # A component coming back after it was released for room: the run needs both in turn (a job of many
        # batches). Releasing again just to keep the reserve would reload one of them every batch; keep what fits.
        reserve = 0 if name in self.released else memory.reserve_for(budget.total, self.long_lived)
        others = {k: v for k, v in self._held.items() if k != name}
        released = memory.to_release(need, budget.free, others, self._in_use, reserve)
        for other in released:
            self.release(other, reason=f"to make room for {name}")
        if released:
            budget = self.budget()
        if need > budget.free:
            message, hint = memory.refusal(what, need, budget, choices, released)
            raise EnvironmentProblem(message, hint=hint)
        self.log(f"{name}: about {memory.format_bytes(need)} needed, {memory.format_bytes(budget.free)} of "
                 f"{budget.where} free")

    def release(self, name: str, reason: str = "") -> None:
        """Drop one loaded component now (it loads again when next asked for)."""
        self._components.pop(name, None)
        self._held.pop(name, None)
        self.loads[:] = [r for r in self.loads if r.component != name]
        self.released.append(name)
        import gc

        gc.collect()
        if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
            sys.modules["torch"].cuda.empty_cache()
        self.log(f"released {name}{f' {reason}' if reason else ''}")

    def _estimate(self, name: str, compute: Callable[[], int]) -> int | None:
        """An estimate, or None when the files cannot tell (the load reports broken files itself)."""
        try:
            return compute()
        except Exception:  # a damaged file: its load gives the real error
            return None

    def log(self, message: str) -> None:
        if self.options.verbose:
            print(f"mio: {message}", file=sys.stderr)

    def _once(self, name: str, parts: frozenset[str], load: Callable[[], Any]) -> Any:
        """`load()`, unless the same component (with no more parts) already failed: then its error again.

        A model problem does not go away between inputs; without this, a run over 20 images would
        read a corrupt checkpoint 20 times and (to a caller that goes on) report it 20 times.
        """
        for (failed, failed_parts), error in self._failures.items():
            if failed == name and failed_parts <= parts:
                raise error
        try:
            return load()
        except ModelError as exc:
            self._failures[(name, parts)] = exc
            raise

    def _timed_load(self, name: str, loader: Any, detail: str = "") -> Any:
        rss_before = memory_in_use()
        start = time.perf_counter()
        try:
            with library_stdio():
                component = loader()
        except BaseException:
            self._held.pop(name, None)
            raise
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
    def require(self, components: Iterable[str]) -> None:
        """Check, before any input is read, that the folder holds every component a task needs.

        The cheap folder checks (checkpoint.require_components): missing, truncated or mismatched
        files and folders that ask to run custom code become one ModelError before any work is
        done; it is remembered like a failed load.
        """
        # Checked once per component: a warm server must not reread the folder's JSON for every request.
        names = sorted(set(components) - self._checked)
        if names:
            self._once("require:" + ",".join(names), frozenset(),
                       lambda: checkpoint.require_components(self.model_dir, names))
            self._checked.update(names)

    @property
    def tokenizer(self) -> MioTokenizer:
        if "tokenizer" not in self._components:
            self._components["tokenizer"] = self._once("tokenizer", frozenset(), self._load_tokenizer)
        return self._components["tokenizer"]

    def _load_tokenizer(self) -> MioTokenizer:
        from miocli.tokenizer import MioTokenizer

        checkpoint.require_components(self.model_dir, [checkpoint.LLM])
        tokenizer = self._timed_load("tokenizer", lambda: MioTokenizer.from_dir(self.model_dir))
        require_media_tokens(tokenizer, self.model_dir)
        return tokenizer

    @property
    def llm(self) -> Any:
        if "llm" not in self._components:
            self._components["llm"] = self._once("llm", frozenset(), self._load_llm)
        return self._components["llm"]

    def _load_llm(self) -> Any:
        checkpoint.require_components(self.model_dir, [checkpoint.LLM])
        quantize = resolve_quantize(self.options.quantize, self.device)
        vocabulary = self.tokenizer.vocab_size
        config = memory.llm_config(self.model_dir)
        if config is not None:
            size = memory.llm_size(config)
            dtype = str(llm_compute_dtype(self.dtype, quantize)).replace("torch.", "")
            need = memory.llm_bytes(size, dtype, quantize)
            label = f"quantize {quantize}" if quantize != "none" else dtype
            self.make_room("llm", need, f"the LLM ({size.parameters / 1e9:.2f} B parameters, {label}, {self.device})",
                           memory.llm_choices(size, self.device.type, self.device.type == "cuda" or cpu_has_bf16()))
            self._held["llm"] = need
        return self._timed_load(
            "llm", lambda: load_llm(self.model_dir, self.device, self.dtype, quantize, tokenizer_vocab=vocabulary),
            detail=f"{self.device}, {str(llm_compute_dtype(self.dtype, quantize)).replace('torch.', '')}, "
            f"quantize={quantize}",
        )

    def _codec(self, name: str, component: str, parts: frozenset[str], loader: Any) -> Any:
        """Load a codec once with the parts asked for; a later, larger request reloads it."""
        cached = self._components.get(name)
        if cached is not None and parts <= cached[0]:
            return cached[1]
        wanted = parts | (cached[0] if cached is not None else frozenset())

        def load() -> Any:
            checkpoint.require_components(self.model_dir, [component])
            need = self._estimate(name, lambda: self._codec_bytes(name, wanted))
            if need is not None:
                if cached is not None:  # the smaller copy goes before the larger one loads
                    self.release(name, reason="to load it with more parts")
                self.make_room(name, need, f"{_LABELS[name]} ({'+'.join(sorted(wanted))}, {self.device})")
                self._held[name] = need
            return self._timed_load(name, lambda: loader(wanted), detail="+".join(sorted(wanted)))

        codec = self._once(name, wanted, load)
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

            def load() -> Any:
                checkpoint.require_components(self.model_dir, [checkpoint.UNCLIP])
                # Half precision on the CPU is slow or missing for convolutions: the decoder runs float32 there.
                dtype = "float32" if self.device.type == "cpu" else str(self.dtype).replace("torch.", "")
                folder = self.model_dir / checkpoint.UNCLIP_FOLDER
                need = self._estimate("unclip", lambda: memory.codec_bytes(memory.unclip_elements(folder), dtype,
                                                                           memory.UNCLIP_FIXED))
                if need is not None:
                    self.make_room("unclip", need, f"the unCLIP image decoder ({dtype}, {self.device})")
                    self._held["unclip"] = need
                return self._timed_load("unclip", lambda: UnclipDecoder.load(
                    self.model_dir / checkpoint.UNCLIP_FOLDER, device=self.device, dtype=self.dtype))

            self._components["unclip"] = self._once("unclip", frozenset(), load)
        return self._components["unclip"]

    def _codec_bytes(self, name: str, parts: frozenset[str]) -> int:
        if name == "seed":
            dtype = self.dtype if self.device.type == "cuda" else self.cpu_codec_dtype()
            elements = memory.seed_elements(self.model_dir / "seed-tokenizer-2", parts)
            return memory.codec_bytes(elements, str(dtype).replace("torch.", ""))
        return memory.codec_bytes(memory.speech_elements(self.model_dir / "SpeechTokenizer", parts), "float32")

    def cpu_codec_dtype(self) -> torch.dtype:
        import torch

        return self.dtype if self.options.dtype != "auto" else torch.float32

    def loaded(self) -> list[str]:
        return [r.component for r in self.loads]

    def unload(self) -> list[str]:
        """Drop every loaded component (a long-lived server gone idle); each loads again on its next use."""
        names = self.loaded()
        for name in ("llm", "seed", "speech", "unclip", "tokenizer"):
            self._components.pop(name, None)
        self.loads.clear()
        self._held.clear()
        # Files repaired while idle get their chance at the next load.
        self._failures.clear()
        self._checked.clear()
        import gc

        gc.collect()
        if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
            sys.modules["torch"].cuda.empty_cache()
        return names


_LABELS = {"seed": "the SEED image tokenizer", "speech": "the SpeechTokenizer"}


def _count_parameters(component: Any) -> int:
    # mio's quantized CPU layers keep their weights as buffers: counted here as the weights they stand for
    modules = getattr(component, "modules", None)
    quantized = sum(m.in_features * m.out_features for m in modules() if getattr(m, "mio_quantized", False)) \
        if callable(modules) else 0
    counter = getattr(component, "num_parameters", None)
    if callable(counter):
        try:
            return int(counter()) + quantized
        except TypeError:
            pass
    parameters = getattr(component, "parameters", None)
    if callable(parameters):
        return sum(p.numel() for p in parameters()) + quantized
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


class _NoInput(io.TextIOBase):
    """sys.stdin while a library loads: every read fails at once, so nothing can prompt and wait.

    transformers asks "Do you wish to run the custom code? [y/N]" with input(); mio never wants
    that question asked (the answer is always no), least of all answered by a pipe meant for mio.
    """

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1, /) -> str:
        raise OSError("mio does not let a library read stdin while it loads a model")

    def readline(self, size: int | None = -1, /) -> str:
        raise OSError("mio does not let a library read stdin while it loads a model")

    def fileno(self) -> int:
        raise io.UnsupportedOperation("no stdin while a model loads")

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def library_stdio() -> Iterator[None]:
    """While a library loads a model: stdin unreadable, and whatever it prints goes to stderr.

    stdout carries mio's results (--json lines a program parses); a library's notice there would
    corrupt them. Reentrant; restores both streams however the block ends.
    """
    saved_stdin = sys.stdin
    sys.stdin = _NoInput()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdin = saved_stdin


# The tokens the protocol writes and parses (MIO_PROTOCOL §2-§4); a tokenizer without one would fail
# with a KeyError in the middle of a run.
def _media_tokens() -> list[str]:
    return [protocol.BOS, protocol.EOS, protocol.IMAGE_BEGIN, protocol.IMAGE_END, protocol.SPEECH_BEGIN,
            protocol.SPEECH_END, *(f"<img{i}>" for i in range(protocol.IMAGE_CODEBOOK_SIZE)),
            *(f"<spch{i}>" for i in range(protocol.SPEECH_CODEBOOK_SIZE * protocol.SPEECH_LAYERS_IN_OUTPUT))]


def require_media_tokens(tokenizer: MioTokenizer, model_dir: Path) -> None:
    """ModelError unless the tokenizer has every token MIO's protocol uses."""
    missing = []
    for token in _media_tokens():
        try:
            tokenizer.token_to_id(token)
        except KeyError:
            missing.append(token)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelError(f"the tokenizer in {model_dir} lacks MIO's tokens {shown}",
                         hint="added_tokens.json / tokenizer_config.json are not MIO's: " + LLM_REDOWNLOAD_HINT)


LLM_REDOWNLOAD_HINT = "check the folder with `mio doctor`; re-download damaged or incomplete files (`mio download`)"


def llm_config(model_dir: Path) -> Any:
    """The LLM's transformers config, never with code from the folder."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoConfig

    try:
        with warnings.catch_warnings(), library_stdio():
            warnings.simplefilter("ignore")
            return AutoConfig.from_pretrained(model_dir, trust_remote_code=False, local_files_only=True)
    except Exception as exc:  # transformers raises ValueError, OSError, KeyError... for a bad config
        raise ModelError(f"cannot read the LLM config {model_dir / 'config.json'}: {exc.__class__.__name__}: "
                         f"{exc}".splitlines()[0], hint=LLM_REDOWNLOAD_HINT) from exc


def check_vocabulary(config: Any, tokenizer_vocab: int, model_dir: Path) -> None:
    """ModelError when the LLM has fewer token rows than the tokenizer has ids (they would index past them)."""
    vocab_size = getattr(config, "vocab_size", None)
    if isinstance(vocab_size, int) and vocab_size < tokenizer_vocab:
        raise ModelError(
            f"the LLM in {model_dir} has a vocabulary of {vocab_size} (config.json vocab_size) but its tokenizer "
            f"has {tokenizer_vocab} tokens",
            hint="the LLM and the tokenizer files come from different models; " + LLM_REDOWNLOAD_HINT,
        )


def _float_dtype(name: str) -> bool:
    """Whether a safetensors dtype name (F16, BF16, F32, F8_E4M3, ...) is a floating type."""
    return name.startswith(("F", "BF"))


def _llm_tensors(model_dir: Path) -> dict[str, tuple[str, tuple[int, ...], bool]]:
    """name -> (file, shape, is float) of every tensor in the LLM weight files, without reading weights:
    safetensors headers, or a memory-mapped weights_only read of .bin files."""
    files = [n for n in ("model.safetensors", "pytorch_model.bin") if (model_dir / n).is_file()][:1]
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (model_dir / index_name).is_file():
            files = sorted(set(json.loads((model_dir / index_name).read_text())["weight_map"].values()))
            break
    found: dict[str, tuple[str, tuple[int, ...], bool]] = {}
    for name in files:
        path = model_dir / name
        if path.suffix == ".safetensors":
            for key, (dtype, shape) in checkpoint.safetensors_tensors(path).items():
                found[key] = (name, shape, _float_dtype(dtype))
        else:
            from miocli.codecs.weights import read_tensor_file

            for key, tensor in read_tensor_file(path, LLM_REDOWNLOAD_HINT).items():
                found[key] = (name, tuple(tensor.shape), tensor.is_floating_point())
    return found


def llm_weight_problems(model_dir: Path, config: Any) -> list[str]:
    """What in the LLM weight files does not fit `config`: missing tensors, wrong shapes, non-float data.

    The expected names and shapes come from the model built on the meta device (no memory, ~1 s
    at 7B), the present ones from the file headers: a 12 GB checkpoint is checked without reading it.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from miocli.codecs.weights import format_keys

    with warnings.catch_warnings(), library_stdio(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    expected = {key: (tuple(t.shape), t.is_floating_point()) for key, t in model.state_dict().items()}
    found = _llm_tensors(model_dir)
    # A tied output head is the embedding: files rightly leave it out.
    optional = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [key for key in expected if key not in found and key not in optional]
    wrong = [f"{key} is {found[key][1]} in {found[key][0]}, config.json implies {shape}"
             for key, (shape, _) in expected.items() if key in found and found[key][1] != shape]
    not_float = [f"{key} in {found[key][0]}" for key, (_, is_float) in expected.items()
                 if key in found and is_float and not found[key][2]]
    problems = [f"missing tensors: {format_keys(missing)}"] if missing else []
    problems += [f"wrong shapes: {format_keys(wrong)}"] if wrong else []
    problems += [f"not float tensors: {format_keys(not_float)}"] if not_float else []
    return problems


def check_llm(model_dir: Path) -> None:
    """Everything a load of the LLM and its tokenizer checks, without loading the weights (`mio doctor`):
    the tokenizer loads and has MIO's tokens, the config loads without custom code, the vocabulary
    covers the tokenizer, and the weight files hold every tensor in the config's shapes."""
    from miocli.tokenizer import MioTokenizer

    with library_stdio():
        tokenizer = MioTokenizer.from_dir(model_dir)
    require_media_tokens(tokenizer, model_dir)
    config = llm_config(model_dir)
    check_vocabulary(config, tokenizer.vocab_size, model_dir)
    problems = llm_weight_problems(model_dir, config)
    if problems:
        raise ModelError(f"the LLM weights in {model_dir} do not fit its config.json: {'; '.join(problems)}",
                         hint=LLM_REDOWNLOAD_HINT)


def load_llm(model_dir: Path, device: torch.device, dtype: torch.dtype, quantize: str,
             tokenizer_vocab: int | None = None) -> Any:
    """The LLM, ready for inference; `tokenizer_vocab` is checked against its vocabulary before and after."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = llm_config(model_dir)
    if tokenizer_vocab is not None:
        check_vocabulary(config, tokenizer_vocab, model_dir)
    # Never code from the folder, whatever its config asks (checkpoint refuses such folders first).
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    if quantize in ("8bit", "4bit") and device.type == "cpu":
        return _load_llm_quantized_cpu(model_dir, config, quantize, tokenizer_vocab)
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
    # A failed load logs a many-line report ahead of its exception; mio's one error line names the cause.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), library_stdio():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, config=config, dtype=dtype, device_map={"": str(device)}, **kwargs
            )
    except Exception as exc:  # truncated or corrupt weight files raise library-specific errors
        raise _llm_load_error(model_dir, config, exc) from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval()
    _check_rows(model, model_dir, tokenizer_vocab)
    return model


def _load_llm_quantized_cpu(model_dir: Path, config: Any, quantize: str, tokenizer_vocab: int | None) -> Any:
    """8-bit or 4-bit weight-only on the CPU, quantized tensor by tensor as it loads (miocli.quantize)."""
    from miocli.quantize import load_quantized_llm

    try:
        with warnings.catch_warnings(), library_stdio():
            warnings.simplefilter("ignore")
            model = load_quantized_llm(model_dir, config, 8 if quantize == "8bit" else 4)
    except ModelError:
        raise
    except Exception as exc:  # corrupt weight files raise library-specific errors
        raise _llm_load_error(model_dir, config, exc) from exc
    _check_rows(model, model_dir, tokenizer_vocab)
    return model


def _check_rows(model: Any, model_dir: Path, tokenizer_vocab: int | None) -> None:
    if tokenizer_vocab is not None:
        heads = [model.get_input_embeddings(), model.get_output_embeddings()]
        rows = min(int(head.weight.shape[0]) for head in heads if head is not None)
        if rows < tokenizer_vocab:
            raise ModelError(f"the LLM in {model_dir} has {rows} token embeddings but its tokenizer has "
                             f"{tokenizer_vocab} tokens",
                             hint="the LLM and the tokenizer files come from different models; " + LLM_REDOWNLOAD_HINT)


def _llm_load_error(model_dir: Path, config: Any, exc: Exception) -> ModelError:
    """The ModelError for a failed LLM load: what the files lack when the headers show it, else the library's words."""
    try:
        problems = llm_weight_problems(model_dir, config)
    except Exception:  # the diagnosis is a better message only; the load's own error still stands
        problems = []
    if problems:
        return ModelError(f"the LLM weights in {model_dir} do not fit its config.json: {'; '.join(problems)}",
                          hint=LLM_REDOWNLOAD_HINT)
    return ModelError(f"cannot load the LLM from {model_dir}: {exc.__class__.__name__}: {exc}".splitlines()[0],
                      hint=LLM_REDOWNLOAD_HINT)
