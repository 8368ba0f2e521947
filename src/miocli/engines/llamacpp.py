"""`--engine llamacpp`: MIO's LLM on llama.cpp (llama-cpp-python) in this process, one sequence at a time.

`pip install 'miocli[llamacpp]'` (llama-cpp-python builds llama.cpp from source: several minutes).
The model is the checkpoint's GGUF export (`miocli.model.gguf_export.cached_gguf`, made once next
to the quantized cache): Q4_0 for `--quantize 4bit`, Q8_0 for `8bit`, else f32 or f16 after the
dtype. Prompts go in as ids and answers come out as ids; mio's tokenizer, prompts and codecs stay
as with every engine.

Each step's logits pass through one llama.cpp logits processor that is mio's: the repetition
penalty as transformers computes it (over prompt and answer), then the decodable-output rule
(`SegmentConstraint`) or, when sampling, mio's per-prompt seeded sampler (`RowSampler`, which
leaves only the drawn token finite); llama.cpp's own sampler is greedy after it. So greedy answers
follow the same arithmetic as the transformers engine, up to the two engines' kernels.

llama.cpp has no beam search: a preset's beams run as one beam with a note; `--beams N` asked for
explicitly is refused. Prompts run one after another: no batching (`--batch-size` only paces
progress), and `mio serve --engine llamacpp` answers one sequence at a time.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from miocli.engines.base import GenerationSettings, Job, finish
from miocli.errors import EnvironmentProblem, ModelError, UsageError

if TYPE_CHECKING:
    from miocli.model.runtime import Runtime

INSTALL_HINT = ("pip install 'miocli[llamacpp]' (it compiles llama.cpp, several minutes), "
                "or use --engine transformers")


def llamacpp_problem() -> str | None:
    """Why llama-cpp-python cannot be used here, or None when it can (checked without importing it)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed in this Python"
    if importlib.util.find_spec("gguf") is None:
        return "the gguf package (which writes the model's GGUF) is not installed in this Python"
    return None


def missing_llamacpp(problem: str) -> EnvironmentProblem:
    return EnvironmentProblem(f"--engine llamacpp: {problem}", hint=INSTALL_HINT)


def gguf_type_for(quantize: str, dtype: str) -> str:
    """The GGUF type that stands for mio's --quantize / --dtype choice."""
    if quantize == "4bit":
        return "q4_0"
    if quantize == "8bit":
        return "q8_0"
    return "f32" if dtype == "float32" else "f16"


def llamacpp_settings(settings: GenerationSettings, asked_beams: int | None) -> tuple[GenerationSettings, str | None]:
    """What llama.cpp runs of `settings`, and a note when a preset's beams become one beam.

    Beams the user asked for are refused: the answer would not be what was asked."""
    if settings.num_beams <= 1:
        return settings, None
    if asked_beams is not None and asked_beams > 1:
        raise UsageError(f"--engine llamacpp has no beam search (--beams {asked_beams})",
                         hint="pass --beams 1, or use --engine transformers for beam search")
    mode = "sampling" if settings.do_sample else "greedy"
    return replace(settings, num_beams=1), (
        f"llama.cpp has no beam search: running {mode} with 1 beam instead of the preset's {settings.num_beams} "
        "(--engine transformers runs the preset exactly; --beams 1 silences this)")


def threads() -> int:
    """Every core this process may use ($MIO_LLAMACPP_THREADS overrides): llama-cpp-python's own default
    is half of them."""
    given = os.environ.get("MIO_LLAMACPP_THREADS")
    if given:
        try:
            return max(1, int(given))
        except ValueError:
            raise UsageError(f"$MIO_LLAMACPP_THREADS is {given!r}", hint="give a whole number of threads") from None
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class StepProcessor:
    """mio's logits processor for one answer, in llama-cpp-python's form: `(ids, scores) -> scores` on
    numpy arrays, `ids` being the prompt and the answer so far."""

    def __init__(self, settings: GenerationSettings, constraint: Any, seed: int | None) -> None:
        from miocli.engines.transformers_processors import RowSampler

        self.penalty = settings.repetition_penalty
        self.constraint = constraint
        self.sampler = None
        if settings.do_sample:
            import secrets

            self.sampler = RowSampler([seed if seed is not None else secrets.randbits(63)], settings, constraint)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import numpy
        import torch

        ids = torch.from_numpy(numpy.asarray(input_ids, dtype=numpy.int64)).unsqueeze(0)
        logits = torch.from_numpy(numpy.array(scores, dtype=numpy.float32)).unsqueeze(0)
        if self.penalty != 1.0:
            # transformers' RepetitionPenaltyLogitsProcessor: every id seen so far, prompt included
            seen = logits.gather(1, ids)
            logits.scatter_(1, ids, torch.where(seen < 0, seen * self.penalty, seen / self.penalty))
        if self.sampler is not None:
            logits = self.sampler(ids, logits)
        elif self.constraint is not None:
            logits = self.constraint(ids, logits)
        return logits[0].numpy()


class LlamaCpp:
    """One `llama_cpp.Llama` over the runtime's checkpoint's GGUF, built on the first generation."""

    name = "llamacpp"

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._llm: Any = None
        self._vocab: Any = None

    def gguf_type(self) -> str:
        """--quantize, else --dtype; `--dtype auto` is f32 for a small LLM (exact, cheap) and f16 for a large one,
        which llama.cpp computes on any x86-64 CPU with F16C (where torch's auto would fall back to float32)."""
        from miocli.model import memory
        from miocli.model.devices import BF16_FROM_PARAMETERS, resolve_quantize

        options = self.runtime.options
        quantize = resolve_quantize(options.quantize, self.runtime.device)
        if options.dtype == "auto":
            config = memory.llm_config(self.runtime.model_dir)
            large = config is not None and memory.llm_size(config).parameters >= BF16_FROM_PARAMETERS
            return gguf_type_for(quantize, "float16" if large else "float32")
        return gguf_type_for(quantize, options.dtype)

    def llm(self) -> Any:
        if self._llm is None:
            problem = llamacpp_problem()
            if problem:
                raise missing_llamacpp(problem)
            import time

            from miocli.engines.base import note_once
            from miocli.model.gguf_export import cached_gguf
            from miocli.model.stdio import library_stdio

            runtime = self.runtime
            if runtime.device.type != "cpu":
                note_once("--engine llamacpp runs on the CPU here (this llama-cpp-python build; no GPU layers)")
            path = cached_gguf(runtime.model_dir, self.gguf_type(), log=runtime.log)
            from miocli.model.memory import llm_config

            config = llm_config(runtime.model_dir) or {}
            context = int(config.get("max_position_embeddings") or 4096)
            start = time.perf_counter()
            try:
                from llama_cpp import Llama

                with library_stdio():
                    self._llm = Llama(model_path=str(path), n_ctx=context, n_batch=512, n_threads=threads(),
                                      n_threads_batch=threads(), seed=0, verbose=runtime.options.verbose)
            except ImportError as exc:
                raise missing_llamacpp(f"llama-cpp-python is installed but does not import: {exc}") from None
            except (ValueError, RuntimeError) as exc:
                first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
                raise ModelError(f"llama.cpp could not load {path}: {first}",
                                 hint="delete that file to export it again, or use --engine transformers") from None
            runtime.log(f"loaded llama.cpp engine ({path.name}, {threads()} threads) in "
                        f"{time.perf_counter() - start:.1f} s")
        return self._llm

    def generate(self, job: Job) -> list[list[int]]:
        llm = self.llm()
        results: list[list[int]] = []
        for start in range(0, len(job.prompts), job.batch_size):
            for n in range(start, min(start + job.batch_size, len(job.prompts))):
                results.append([] if job.is_cancelled(n) else self._answer(llm, job, n))
            if job.on_batch_done is not None:
                job.on_batch_done(min(job.batch_size, len(job.prompts) - start))
        job.check_cancelled(range(len(job.prompts)))
        return results

    def _answer(self, llm: Any, job: Job, n: int) -> list[int]:
        from llama_cpp import LogitsProcessorList

        from miocli.engines.rules import MediaVocabulary
        from miocli.engines.transformers_processors import SegmentConstraint

        prompt = [int(i) for i in job.prompts[n]]
        settings = job.settings
        constraint = None
        if job.rule_for is not None:
            if self._vocab is None:
                self._vocab = MediaVocabulary(self.runtime.tokenizer)
            constraint = SegmentConstraint(self._vocab, len(prompt), settings.max_new_tokens,
                                           rule=job.rule_for(settings.max_new_tokens))
        seed = job.seeds[n] if job.seeds is not None else None
        processor = StepProcessor(settings, constraint, seed)
        answer: list[int] = []
        if settings.max_new_tokens <= 0:
            return answer
        # Greedy after mio's processor: it has applied the penalty, the rule and any sampling already.
        for token in llm.generate(prompt, temp=0.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                  logits_processor=LogitsProcessorList([processor])):
            token = int(token)
            if token == job.stop_id:
                break
            answer.append(token)
            if job.on_tokens is not None:
                job.on_tokens(n, [token])
            if len(answer) >= settings.max_new_tokens or job.is_cancelled(n):
                break
        return finish(answer, job.stop_id, job.pad_id)
