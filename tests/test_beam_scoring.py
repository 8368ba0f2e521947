"""`--beam-scoring reference`: finished beams length-normalised by the whole row, as transformers 4.34 did.

The random tiny model almost never says its stop token, so every beam runs to --max-new-tokens and
both scorings agree. These tests use a copy of the tiny checkpoint rewired into a chain with a known
answer distribution: its layers add nothing, so the last hidden state is the current token's
embedding, and one-hot embeddings and output rows make the assistant starter's "\\n" go on with the
letters a, b, c, ... one by one; after some letters `<|im_end|>` gets a set probability. Every other
token has a log-probability near -30, so the answers the model can give are few: stop after k
letters, or run to the limit. That makes each scoring's choice computable by hand (`candidates`),
independently of transformers' beam search.
"""

from __future__ import annotations

import contextlib
import json
import math
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mio_testing import one_torch_thread, rewired_checkpoint, run_mio  # noqa: F401  (one_torch_thread: autouse)
from miocli import protocol
from miocli.core.prompts import Prompt
from miocli.errors import UsageError
from miocli.model.tokenizer import MioTokenizer

MAX_NEW = 24
BEAMS = 5
LETTERS = string.ascii_lowercase[:MAX_NEW]
CERTAIN = 30.0  # the logit of a likely token; all others stay at 0, e^-30 behind
# (question, chat keywords): the first prompt is short (26 tokens with the tiny tokenizer), the others
# carry the standard system prompt (70 tokens and more).
CHATS = [
    ("hi", {"mode": "custom", "system": "x"}),
    ("hi", {}),
    ("What is the capital of France?", {}),
    ("Tell me about the red kite and the quick brown fox.", {}),
]
HALF = 0.5
# The chain model: stop after 2 letters with probability 1/2, after 10 letters with 0.88 of what is left.
# Per answer token, the 10-letter answer is better (log 0.44 / 11 > log 0.5 / 3); as a whole it is less
# likely (log 0.44 < log 0.5). With the prompt counted, the 2-letter answer wins once the prompt is
# longer than about 41 tokens: the short prompt keeps the long answer, the standard ones do not.
CHAIN_STOPS = {2: HALF, 10: 0.88}


def build_chain_model(tiny_model: Path, folder: Path, stops: dict[int, float]) -> Path:
    """A copy of the tiny checkpoint answering "\\n" → a → b → ... ; after `k` letters it stops with
    probability `stops[k]` (otherwise with probability ~e^-30)."""
    tokenizer = MioTokenizer.from_dir(tiny_model)
    chain = tokenizer.encode("\n") + [tokenizer.encode(letter)[0] for letter in LETTERS]
    assert len(chain) == len(set(chain)) == len(LETTERS) + 1, "each letter must be one token of its own"
    stop_id = tokenizer.token_to_id(protocol.IM_END)

    def rows(embed: Any, head: Any) -> None:
        assert len(LETTERS) + 1 <= embed.shape[1], "one hidden dimension per chain state"
        # RMSNorm turns the one-hot embedding into sqrt(hidden) along its dimension.
        unit = math.sqrt(embed.shape[1])
        for state, current in enumerate(chain):
            embed[current, state] = 1.0
            stop = stops.get(state, 0.0)
            if state + 1 < len(chain):
                head[chain[state + 1], state] = (CERTAIN + math.log(1.0 - stop)) / unit
            if stop:
                head[stop_id, state] = (CERTAIN + math.log(stop)) / unit

    return rewired_checkpoint(tiny_model, folder, rows)


@dataclass(frozen=True)
class Candidate:
    ids: tuple[int, ...]  # the answer, stop token left out
    logprob: float  # of the answer and, when finished, its stop token
    finished: bool  # ended by the stop token (else: ran to MAX_NEW)


def candidates(llm: Any, row: list[int], stop_id: int) -> list[Candidate]:
    """Every answer the chain model gives a log-probability above about -30: stop after k letters, or not at all.

    Read off the model's own next-token distributions (one forward pass per step), checking on the way that
    the next letter and the stop token hold all the mass."""
    import torch

    answer: list[int] = []
    total = 0.0
    found = []
    for _ in range(MAX_NEW):
        with torch.inference_mode():
            logits = llm(torch.tensor([row + answer])).logits[0, -1].double()
        logprobs = torch.log_softmax(logits, dim=-1)
        stop = float(logprobs[stop_id])
        logprobs[stop_id] = -math.inf
        following = int(logprobs.argmax())
        assert math.exp(stop) + math.exp(float(logprobs[following])) > 1 - 1e-6
        found.append(Candidate(tuple(answer), total + stop, True))
        total += float(logprobs[following])
        answer.append(following)
    found.append(Candidate(tuple(answer), total, False))
    return found


# How each scoring divides a candidate's log-probability (length_penalty 1), given the prompt's length.
def answer_length(prompt: int) -> Callable[[Candidate], int]:
    """transformers >= 4.35: the answer's tokens, its stop token included."""
    return lambda c: len(c.ids) + (1 if c.finished else 0)


def transformers_434_length(prompt: int) -> Callable[[Candidate], int]:
    """transformers 4.34 (`BeamHypotheses.add`): the whole row the hypothesis was stored as, i.e. prompt
    (with its left padding) and answer; a beam that stopped is stored before its stop token is appended."""
    return lambda c: prompt + len(c.ids)


def best(found: list[Candidate], length: Callable[[Candidate], int]) -> tuple[int, ...]:
    return max(found, key=lambda c: c.logprob / length(c)).ids


# ---- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chain_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_chain_model(tiny_model, tmp_path_factory.mktemp("chain-model"), CHAIN_STOPS)


@pytest.fixture(scope="module")
def chain(chain_model: Path) -> Any:
    from miocli.core.api import Mio

    return Mio(str(chain_model), device="cpu")


def prompt_row(mio: Any, question: str, keywords: dict[str, str]) -> list[int]:
    return mio.engine.encode([Prompt(mio.chat_prompt(question, **keywords))])[0]


def stop_id(mio: Any) -> int:
    return mio.runtime.tokenizer.token_to_id(protocol.IM_END)


# ---- 1. the difference and its direction, through the API and the entry point -------------------------
def test_reference_scoring_gives_shorter_answers_where_the_prompt_is_long(chain):
    rows = [prompt_row(chain, question, keywords) for question, keywords in CHATS]
    assert len(rows[0]) < 41 < min(len(row) for row in rows[1:]), [len(row) for row in rows]
    ours = [chain.chat(q, beams=BEAMS, max_new_tokens=MAX_NEW, **kw).token_ids for q, kw in CHATS]
    reference = [chain.chat(q, beams=BEAMS, max_new_tokens=MAX_NEW, beam_scoring="reference", **kw).token_ids
                 for q, kw in CHATS]
    ours_lengths, reference_lengths = [len(ids) for ids in ours], [len(ids) for ids in reference]
    # The beams finish at different lengths, and whole-row scoring never picks a longer answer.
    assert all(r <= o for r, o in zip(reference_lengths, ours_lengths)), (reference_lengths, ours_lengths)
    assert any(r < o for r, o in zip(reference_lengths, ours_lengths)), (reference_lengths, ours_lengths)
    # Exactly the lengths the two formulas predict: answer scoring does not see the prompt at all; the
    # reference keeps the long answer for the short prompt only.
    assert ours_lengths == [10, 10, 10, 10]
    assert reference_lengths == [10, 2, 2, 2]
    for row, mine, theirs in zip(rows, ours, reference):
        found = candidates(chain.runtime.llm, row, stop_id(chain))
        assert list(best(found, answer_length(len(row)))) == mine
        assert list(best(found, transformers_434_length(len(row)))) == theirs


@pytest.mark.ci  # slow; its commands also run in tests/test_readme.py or its neighbours
def test_the_cli_takes_beam_scoring_reference_and_answers_as_the_api(chain, chain_model: Path):
    question = "hi"
    texts = {}
    for scoring in ("answer", "reference"):
        done = run_mio("chat", question, "--model", str(chain_model), "--device", "cpu", "--json",
                       "--beams", str(BEAMS), "--max-new-tokens", str(MAX_NEW), "--beam-scoring", scoring)
        assert done.returncode == 0, done.stderr
        texts[scoring] = json.loads(done.stdout)["text"]
        api = chain.chat(question, beams=BEAMS, max_new_tokens=MAX_NEW, beam_scoring=scoring)
        assert texts[scoring] == api.text
    assert texts == {"answer": "abcdefghij", "reference": "ab"}
    default = run_mio("chat", question, "--model", str(chain_model), "--device", "cpu", "--json",
                      "--beams", str(BEAMS), "--max-new-tokens", str(MAX_NEW))
    assert default.returncode == 0, default.stderr
    assert json.loads(default.stdout)["text"] == texts["answer"]


# ---- 2. the scores themselves ------------------------------------------------------------------------
@pytest.mark.parametrize("length_penalty", [1.0, 2.0])
def test_reference_scores_divide_by_the_whole_padded_row(chain, length_penalty: float):
    """transformers' own `sequences_scores`, checked against log-probabilities summed independently: under
    `reference_beam_scoring` the divisor is the whole row (prompt, left padding, answer), without it the
    answer alone. A short prompt batched with a long one is padded to its length and answers as a long one."""
    import torch

    from miocli.engines.transformers_engine import reference_beam_scoring

    llm, pad_id, stop = chain.runtime.llm, chain.runtime.tokenizer.pad_id, stop_id(chain)
    rows = [prompt_row(chain, q, kw) for q, kw in CHATS[:2]]

    def run(batch: list[list[int]], reference: bool) -> list[tuple[list[int], bool, float, int]]:
        width = max(len(row) for row in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(batch):
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        scoring = reference_beam_scoring(llm, stop) if reference else contextlib.nullcontext()
        with torch.inference_mode(), scoring:
            out = llm.generate(input_ids=ids, attention_mask=mask, num_beams=BEAMS, do_sample=False,
                               max_new_tokens=MAX_NEW, eos_token_id=stop, pad_token_id=pad_id,
                               length_penalty=length_penalty, output_scores=True, return_dict_in_generate=True)
        results = []
        for i, row in enumerate(batch):
            new = out.sequences[i, width:].tolist()
            finished = stop in new
            answer = new[: new.index(stop)] if finished else new
            # Independent sum: the model's log-probabilities of the answer and its stop token, given the
            # unpadded prompt (the chain model's layers add nothing, so positions do not matter).
            full = row + answer + ([stop] if finished else [])
            with torch.inference_mode():
                logprobs = torch.log_softmax(llm(torch.tensor([full])).logits[0].double(), dim=-1)
            total = float(logprobs[torch.arange(len(row) - 1, len(full) - 1), torch.tensor(full[len(row):])].sum())
            divisor = (total / float(out.sequences_scores[i])) ** (1 / length_penalty)
            results.append((answer, finished, divisor, width))
        return results

    for answer, finished, divisor, _ in run(rows[:1], reference=False) + run(rows[1:], reference=False):
        assert divisor == pytest.approx(len(answer) + finished, rel=1e-4)  # the answer (and its stop token)
    alone = run(rows[:1], reference=True) + run(rows[1:], reference=True)
    batched = run(rows, reference=True)
    for answer, _finished, divisor, width in alone + batched:
        # The whole row: prompt, its padding and the answer, never the answer alone; as in 4.34, a stopped
        # beam's row without its stop token.
        assert abs(divisor - (width + len(answer))) < 1e-2, (divisor, width)
    if length_penalty == 1.0:
        assert [(len(answer), finished) for answer, finished, _, _ in alone] == [(10, True), (2, True)]
        # Padded to the long prompt's width, the short prompt loses its long answer.
        assert [(len(answer), finished) for answer, finished, _, _ in batched] == [(2, True), (2, True)]


@pytest.fixture(scope="module")
def boundary_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A chain model on the edge for the standard "hi" prompt: 4.34's divisor (the row before the stop
    token) keeps the 10-letter answer, one token more (the stop token counted) picks the 2-letter one."""
    from miocli.core.api import Mio

    length = len(prompt_row(Mio(str(tiny_model), device="cpu"), "hi", {}))
    # With 4.34's divisors the answers tie at a prompt of `edge` tokens: a (L + 10) = b (L + 2), where
    # a = -log(1/2) (2 letters) and b = a - log(q) (10 letters). Put the tie half a token above the prompt.
    edge = length + 0.5
    a = -math.log(HALF)
    b = a * (edge + 10) / (edge + 2)
    stops = {2: HALF, 10: math.exp(a - b)}
    return build_chain_model(tiny_model, tmp_path_factory.mktemp("boundary-model"), stops), "hi"


def test_reference_scoring_matches_transformers_434_on_the_edge(boundary_model):
    from miocli.core.api import Mio

    folder, question = boundary_model
    mio = Mio(str(folder), device="cpu")
    row = prompt_row(mio, question, {})
    found = candidates(mio.runtime.llm, row, stop_id(mio))
    expected = best(found, transformers_434_length(len(row)))
    # Checked with transformers 4.34.0 itself on this model: it answers with 10 letters.
    assert len(expected) == 10
    got = mio.chat(question, beams=BEAMS, max_new_tokens=MAX_NEW, beam_scoring="reference").token_ids
    assert got == list(expected)


# ---- 3. a bad value is a usage error before anything loads ------------------------------------------
def test_unknown_beam_scoring_is_a_usage_error_before_any_load(tiny_model: Path, tmp_path: Path):
    absent = tmp_path / "no-model-here"
    done = run_mio("chat", "hi", "--model", str(absent), "--beam-scoring", "bogus")
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "--beam-scoring 'bogus'" in done.stderr and "no model folder" not in done.stderr
    done = run_mio("chat", "hi", "--model", str(tiny_model), "--device", "cpu", "--beam-scoring", "bogus")
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "--beam-scoring 'bogus'" in done.stderr and "use answer or reference" in done.stderr

    from miocli.core.api import Mio

    mio = Mio(str(tiny_model), device="cpu")
    with pytest.raises(UsageError, match="beam-scoring"):
        mio.chat("hi", beams=BEAMS, max_new_tokens=MAX_NEW, beam_scoring="bogus")
    assert "llm" not in mio.runtime._components
