"""The engine-parity check passes a tie and catches an adapter bug (transformers on both sides, no vLLM).

The vLLM tests (`-m vllm`) use the same `parity.parity_problem`; here the "other engine" is transformers fed the
way a broken adapter would feed it: one prompt id off, or an attention mask that hides part of the prompt.
Each must be caught on every prompt, while the correct adapter passes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mio_testing import one_torch_thread  # noqa: F401  (autouse)
from parity import TIE, first_difference, parity_problem

QUESTIONS = ["What is in this picture?", "Tell me about the red kite.", "Hi", "mem0"]
STEPS = 16


@pytest.fixture(scope="module")
def llm(tiny_model: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(tiny_model: Path) -> list[list[int]]:
    from miocli.core.pipeline import Engine
    from miocli.core.prompts import Prompt, task_prompt_text
    from miocli.core.tasks import TASKS
    from miocli.model.devices import RuntimeOptions
    from miocli.model.runtime import Runtime

    engine = Engine(Runtime(RuntimeOptions(model=str(tiny_model), device="cpu", dtype="float32")))
    return engine.encode([Prompt(task_prompt_text(TASKS["chat"], "instruct", {"question": q}, 0), [])
                          for q in QUESTIONS])


def _greedy(llm: Any, ids: list[int], mask: list[int]) -> list[int]:
    import torch

    out = llm.generate(torch.tensor([ids]), attention_mask=torch.tensor([mask]), do_sample=False, num_beams=1,
                       max_new_tokens=STEPS, min_new_tokens=STEPS, repetition_penalty=1.0, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _forced(llm: Any, ids: list[int], mask: list[int], answer: list[int]) -> list[dict[int, float]]:
    """Log-probabilities of each answer step teacher-forced along `answer`: its token and the best one."""
    import torch

    with torch.no_grad():
        full = torch.tensor([ids + answer])
        logits = llm(full, attention_mask=torch.tensor([mask + [1] * len(answer)])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)[len(ids) - 1 : len(ids) - 1 + len(answer)]
    steps = []
    for row, token in zip(logprobs, answer):
        best = int(row.argmax())
        steps.append({best: float(row[best]), token: float(row[token])})
    return steps


def _adapter(prompt: list[int], bug: str) -> tuple[list[int], list[int]]:
    """The ids and mask a (broken) adapter hands the model."""
    if bug == "off-by-one id":
        return prompt[:-1] + [prompt[-1] + 1], [1] * len(prompt)
    if bug == "wrong mask":
        return prompt, [0] * 4 + [1] * (len(prompt) - 4)
    return prompt, [1] * len(prompt)


def _reference(llm: Any, prompt: list[int]) -> tuple[list[int], list[float]]:
    ones = [1] * len(prompt)
    answer = _greedy(llm, prompt, ones)
    return answer, [step[token] for step, token in zip(_forced(llm, prompt, ones, answer), answer)]


def test_the_same_adapter_passes(llm: Any, prompts: list[list[int]]) -> None:
    for prompt in prompts:
        reference, expected = _reference(llm, prompt)
        ids, mask = _adapter(prompt, "none")
        assert parity_problem(reference, _greedy(llm, ids, mask), _forced(llm, ids, mask, reference), expected) is None


@pytest.mark.parametrize("bug", ["off-by-one id", "wrong mask"])
def test_an_adapter_bug_is_caught_on_every_prompt(llm: Any, prompts: list[list[int]], bug: str) -> None:
    for prompt in prompts:
        reference, expected = _reference(llm, prompt)
        ids, mask = _adapter(prompt, bug)
        problem = parity_problem(reference, _greedy(llm, ids, mask), _forced(llm, ids, mask, reference), expected)
        assert problem is not None, f"{bug} went unnoticed on prompt {prompt[-6:]}"
        assert "more than a tie" in problem
    # Tokens alone miss it on some prompt: the log-probability check is what catches the mask.
    if bug == "wrong mask":
        missed = [p for p in prompts if parity_problem(_reference(llm, p)[0], _greedy(llm, *_adapter(p, bug)),
                                                       _forced(llm, *_adapter(p, bug), _reference(llm, p)[0])) is None]
        assert missed


def test_a_tie_passes_and_a_margin_does_not() -> None:
    reference, other = [5, 6, 7], [5, 6, 9]
    tie = [{5: -0.1}, {6: -0.2}, {9: -1.0, 7: -1.0 - TIE / 2}]
    clear = [{5: -0.1}, {6: -0.2}, {9: -1.0, 7: -1.5}]
    assert parity_problem(reference, other, tie) is None
    assert "step 2" in (parity_problem(reference, other, clear) or "")
    assert parity_problem(reference, reference, clear) is None
    assert first_difference([1, 2], [1, 2, 3]) == 2
