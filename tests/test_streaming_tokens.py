"""Token streaming and cancellation through the engine seam, the core and the CLI (no server here).

`Mio.stream(on_tokens=…, cancelled=…)` is what the server's worker uses: every input of a batch streams its
own ids, and one that is cancelled stops at the next step while the others go on unchanged.
"""

from __future__ import annotations

import os
import pty
import subprocess
from pathlib import Path

import pytest

from mio_testing import MIO_COMMAND, one_torch_thread  # noqa: F401 (autouse fixture)
from miocli import Mio
from miocli.core.deltas import TextDeltas, shown
from miocli.engines.base import Cancelled

QUESTIONS = ["Hello there", "What is a kite?", "Tell me a story about the sea"]
# No decodable-output rule: the random tiny model then rarely stops early, so a cut is visible.
LONG = {"beams": 1, "max_new_tokens": 40, "seed": 0, "constrain": False}


@pytest.fixture(scope="module")
def mio(tiny_model: Path) -> Mio:
    return Mio(str(tiny_model), device="cpu")


def chat_items(mio: Mio) -> list:
    from miocli.core.inputs import Item

    return [Item(q, {"mode": "std"}, prompt=mio.chat_prompt(q)) for q in QUESTIONS]


def test_every_input_of_a_batch_streams_its_own_ids(mio: Mio):
    seen: dict[int, list[int]] = {}
    results = list(mio.stream("chat", chat_items(mio), batch_size=3,
                              on_tokens=lambda index, ids: seen.setdefault(index, []).extend(ids), **LONG))
    assert sorted(seen) == [0, 1, 2]
    for result in results:
        assert seen[result.index][: len(result.token_ids)] == result.token_ids and result.token_ids


def test_a_cancelled_input_stops_at_the_next_step_and_the_others_go_on(mio: Mio):
    alone = list(mio.stream("chat", chat_items(mio), batch_size=3, **LONG))
    counts: dict[int, int] = {}

    def count(index: int, ids: list[int]) -> None:
        counts[index] = counts.get(index, 0) + len(ids)

    results = list(mio.stream("chat", chat_items(mio), batch_size=3, on_tokens=count,
                              cancelled=lambda index: index == 1 and counts.get(1, 0) >= 3, **LONG))
    assert len(alone[1].token_ids) > 4, "the uncancelled answer is longer than the cut"
    assert len(results[1].token_ids) <= 4
    assert [r.token_ids for r in (results[0], results[2])] == [r.token_ids for r in (alone[0], alone[2])]


def test_a_batch_with_every_input_cancelled_ends_at_once(mio: Mio):
    steps: list[int] = []

    def count(_index: int, ids: list[int]) -> None:
        steps.append(len(ids))

    with pytest.raises(Cancelled):
        list(mio.stream("chat", chat_items(mio), batch_size=3, on_tokens=count,
                        cancelled=lambda _index: len(steps) >= 6, **LONG))
    assert len(steps) < 3 * LONG["max_new_tokens"]


def test_beam_search_streams_nothing_but_still_stops_when_cancelled(mio: Mio):
    seen: list[int] = []
    [result] = mio.stream("chat", chat_items(mio)[:1], on_tokens=lambda _i, ids: seen.extend(ids),
                          **{**LONG, "beams": 2, "max_new_tokens": 8})
    assert seen == [] and result.token_ids
    with pytest.raises(Cancelled):
        list(mio.stream("chat", chat_items(mio)[:1], cancelled=lambda _i: True, **{**LONG, "beams": 2}))


def test_seeded_inputs_with_their_own_seeds_answer_as_they_do_alone(mio: Mio):
    from dataclasses import replace

    sampled = {**LONG, "sample": True, "temperature": 0.8, "max_new_tokens": 12}
    items = [replace(item, seed=seed) for item, seed in zip(chat_items(mio), (5, 6, 7))]
    together = list(mio.stream("chat", items, batch_size=3, **sampled))
    for item, result in zip(items, together):
        [alone] = mio.stream("chat", [replace(item, seed=None)], **{**sampled, "seed": item.seed})
        assert result.token_ids == alone.token_ids


def test_chat_on_text_pieces_join_into_the_answer(mio: Mio):
    pieces: list[str] = []
    reply = mio.chat("Hello there", on_text=pieces.append, **LONG)
    assert len(pieces) > 1 and "".join(pieces) == reply.text


# ---- text pieces --------------------------------------------------------------------------------------
def test_shown_holds_back_half_characters_half_tags_and_open_segments():
    assert shown("caf\ufffd") == "caf"
    assert shown("a kite <ima") == "a kite "
    assert shown("a < b and more") == "a < b and more"
    assert shown("look <image><img1><img2>") == "look "
    picture = "<image>" + "".join(f"<img{i}>" for i in range(32)) + "</image>"
    assert shown(f"look {picture} there") == "look <image_placeholder_0> there"
    # A segment the parser rejects stays as it is in the final text, so it is shown as it is.
    assert shown("look <image><img1></image> there") == "look <image><img1></image> there"
    assert shown("say <spch><spch3>") == "say "
    assert shown("x<unk>y") == "xy"


def test_text_deltas_are_prefixes_of_the_final_text(mio: Mio):
    tokenizer = mio.runtime.tokenizer
    [result] = mio.stream("chat", chat_items(mio)[:1], **LONG)
    deltas = TextDeltas(tokenizer.decode)
    pieces = [deltas.push([token]) for token in result.token_ids]
    pieces.append(deltas.finish(result.text))
    assert "".join(pieces) == result.text


# ---- the CLI on a terminal ----------------------------------------------------------------------------
@pytest.mark.ci  # slow (a process per step); .ci/run runs the ci mark
def test_mio_chat_on_a_terminal_prints_the_answer_it_prints_to_a_pipe(tiny_model: Path):
    command = [*MIO_COMMAND, "chat", "--model", str(tiny_model), "--device", "cpu", "--beams", "1",
               "--max-new-tokens", "24", "--seed", "0", "Hello there"]
    piped = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True).stdout
    leader, follower = pty.openpty()
    process = subprocess.Popen(command, stdout=follower, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert process.wait(timeout=300) == 0
    assert b"".join(chunks).decode().replace("\r\n", "\n") == piped
