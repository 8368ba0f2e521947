"""One answer in a conversation: the prompt fitted to the context, then generated (what `Mio.chat` and a
batch's conversation items do). The conversation model is `conversation`; media are encoded once by
`steps.encode_conversation`; the answer's pictures and speech are decoded by the stream."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from miocli.core.conversation import Turn, filled
from miocli.core.inputs import Item
from miocli.core.prompts import Prompt
from miocli.core.results import Result
from miocli.core.tasks import TASKS
from miocli.errors import UsageError
from miocli.protocol import PromptText

log = logging.getLogger("miocli")

@dataclass
class Fitted:
    prompt: PromptText
    turns: list[Turn]
    dropped: int


def fit(mio: Any, turns: Sequence[Turn], mode: str, add_generation_prompt: bool, max_new_tokens: int,
        max_history: int | None) -> Fitted:
    """The prompt of the conversation, within the context with room for an answer.

    Room is the answer's max_new_tokens, or a quarter of the context when that is less. Past the context
    the conversation is refused (UsageError naming the turn and the tokens), unless `max_history` is
    given: then the oldest turns (never a system turn, never the last) are dropped until it fits, and
    at most `max_history` turns are kept before the last.
    """
    kept = list(turns)
    dropped = 0

    def droppable() -> list[int]:
        return [i for i, t in enumerate(kept[:-1]) if t.role != "system"]

    if max_history is not None:
        if max_history < 0:
            raise UsageError("--max-history must be 0 or more")
        while len(droppable()) > max_history:
            del kept[droppable()[0]]
            dropped += 1
    context = mio.engine.context_length()
    while True:
        text = filled(kept, mode, add_generation_prompt)
        if context is None:
            return Fitted(text, kept, dropped)
        room = min(max_new_tokens, context // 4)
        length = _length(mio, text)
        if length + room <= context:
            if dropped:
                log.info(f"dropped the {dropped} oldest turn(s) to stay within the context")
            return Fitted(text, kept, dropped)
        if max_history is None or not droppable():
            raise _too_long(mio, kept, mode, length, context, room, max_history is not None)
        del kept[droppable()[0]]
        dropped += 1


def _length(mio: Any, text: PromptText) -> int:
    return len(mio.engine.encode([Prompt(text)])[0])


def _too_long(mio: Any, turns: list[Turn], mode: str, length: int, context: int, room: int,
              trimming: bool) -> UsageError:
    limit = context - room
    at = len(turns) - 1
    for k in range(1, len(turns) + 1):
        try:
            if _length(mio, filled(turns[:k], mode, False)) > limit:
                at = k - 1
                break
        except UsageError:
            continue  # a custom conversation's prefix without its system turn: keep counting
    hint = "the last turn alone is too long: shorten it" if trimming else \
        "start a new conversation (/reset in -i), or pass --max-history N to drop the oldest turns"
    return UsageError(f"the conversation passes the context at message {at} ({turns[at].role}): {length} tokens, "
                      f"and the model's context of {context} must keep {room} for the answer", hint=hint)


def answer(mio: Any, turns: list[Turn], mode: str, *, add_generation_prompt: bool, options: Any,
           max_history: int | None, on_tokens: Callable[[int, list[int]], None] | None,
           settings: dict[str, Any]) -> tuple[Result, Fitted]:
    """Fit, generate and decode: the answer to the conversation's last turn (its media encoded:
    `steps.encode_conversation`)."""
    task = TASKS["speak" if mode == "voice" else "chat"]
    max_new = mio.engine.settings_for(task, options.overrides()).max_new_tokens
    fitted = fit(mio, turns, mode, add_generation_prompt, max_new, max_history)
    last = next((t for t in reversed(fitted.turns) if t.role == "user"), None)
    item = Item(last.text if last is not None else "", {"mode": mode}, prompt=fitted.prompt)
    # The stream decodes the answer's pictures and speech (steps.Run.results).
    [result] = list(mio.stream("chat", [item], options=options, on_tokens=on_tokens, **settings))
    return result, fitted
