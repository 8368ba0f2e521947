"""Lazy per-component loading: a command pays only for what its task needs.

A `Runtime` holds the model folder and the user's choices (`miocli.model.devices`); each component
(tokenizer, LLM, image codec, speech codec, unCLIP pipeline) is loaded the first time a task asks for
it, after its memory is planned (`miocli.model.memory`). Every load is timed and its memory noted
for `--verbose`.

Loading never trusts the folder: no library may run code shipped with a model, read stdin or
write to stdout (`miocli.model.stdio`), and a component that fails to load fails the same way, at
once, every time it is asked for again (one error for a run, not one per input).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from miocli.errors import EnvironmentProblem, ModelError
from miocli.model import checkpoint, devices, memory
from miocli.model.devices import RuntimeOptions, llm_compute_dtype, resolve_device, resolve_dtype, resolve_quantize
from miocli.model.llm import load_llm, require_media_tokens
from miocli.model.stdio import library_stdio

if TYPE_CHECKING:
    import torch

    from miocli.model.tokenizer import MioTokenizer


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
    # once memory is tight, so its peak is its largest phase (miocli.model.memory).
    long_lived: bool = False
    # Estimated resident bytes of each loaded model component, and those a step is using right now.
    _held: dict[str, int] = field(default_factory=dict)
    _in_use: dict[str, int] = field(default_factory=dict)
    released: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        devices.validate_options(self.options)
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
        from miocli.model.tokenizer import MioTokenizer

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
            native_bf16 = self.device.type == "cuda" or devices.cpu_has_bf16()
            self.make_room("llm", need, f"the LLM ({size.parameters / 1e9:.2f} B parameters, {label}, {self.device})",
                           memory.llm_choices(size, self.device.type, native_bf16))
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
