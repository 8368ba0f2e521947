"""Prompt text: a task's template with its fields and media placeholders, in the chat template.

Instruct prompts wrap the task's user turn (after any in-context examples) in the chat template,
Base prompts are plain text; user text is marked as such (`PromptText`) so that it can never
write tokens (MIO_PROTOCOL §2, docs/security.md). Token ids come later, in `pipeline.Engine.encode`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from miocli import protocol
from miocli.core.tasks import TASKS, Task, media_placeholders
from miocli.core.validate import check_text, template_fields
from miocli.errors import UsageError
from miocli.protocol import PromptText


@dataclass
class Prompt:
    """One generation request: the prompt text (placeholders kept) and its media token strings.

    `text` is a PromptText from the prompt builders, whose user text is encoded as characters.
    A bare str is a raw prompt of user text, as `raw_prompt_text` reads it: its token strings stay
    text and it holds no placeholders; pass `PromptText.trusted(text)` for hand-built prompts.
    """

    text: str
    image_strings: list[str] = field(default_factory=list)
    speech_strings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Shot:
    """One in-context example: how many media items it shows and the answer it should get."""

    media_count: int
    answer: str


# The templates of the task table: their text is the protocol's. Any other template (edit --template,
# Mio.edit(template=...)) was written by a user and is user text, except the media its {media} places.
_TABLE_TEMPLATES = frozenset(t for task in TASKS.values() for t in (task.instruct, task.base) if t is not None)


def user_text(value: Any, what: str) -> PromptText:
    """A value from the user as prompt text: valid text, encoded as its characters.

    A PromptText is taken as it is marked: `PromptText.trusted` is the opt-in for token strings.
    """
    if isinstance(value, PromptText):
        check_text(value, what)
        return value
    if not isinstance(value, str):
        raise UsageError(f"the {what} should be text, not {type(value).__name__}")
    check_text(value, what)
    return PromptText.user(value)


def fill_template(task: Task, template: str, media: str, fields: dict[str, Any]) -> PromptText:
    """`template` with {media} (trusted placeholders) and its fields (user text) filled in."""
    from_table = template in _TABLE_TEMPLATES
    what = f"`{task.name}` template" if from_table else "template"
    parts: list[tuple[str, bool]] = []
    for literal, name in template_fields(template, what):
        parts.append((literal, not from_table))
        if name is None:
            continue
        if name == "media":
            parts.append((media, False))
        elif name in fields:
            parts.append((user_text(fields[name], name), False))
        else:
            raise UsageError(f"the {what} names {{{name}}}, but the input has no {name!r} field",
                             hint=f"give fields {', '.join(sorted(fields)) or '(none given)'} plus {name!r}")
    return PromptText(parts)


def task_prompt_text(
    task: Task, variant: str, fields: dict[str, Any], media_count: int = 0, system: str | None = None,
    shots: Sequence[Shot] = (),
) -> PromptText:
    """The full prompt text of a task (chat template for Instruct, plain text for Base).

    `shots` are in-context examples put before the question, each the same task on its own
    media with its answer: earlier user/assistant turns for Instruct, earlier "prompt answer"
    lines for Base. Their media take the first placeholders, in order. The fields and `system`
    are user text; the answers of the examples are trusted (they may hold token strings).
    """
    template = task.template(variant)
    turns: list[dict[str, Any]] = []
    start = 0
    for shot in shots:
        turns.append({"role": "user", "content": fill_template(
            task, template, media_placeholders(task.media, shot.media_count, start), fields)})
        turns.append({"role": "assistant", "content": PromptText.trusted(shot.answer)})
        start += shot.media_count
    user_turn = fill_template(task, template, media_placeholders(task.media, media_count, start), fields)
    if variant == "base":
        parts: list[tuple[str, bool]] = []
        for i in range(0, len(turns), 2):
            parts += [(turns[i]["content"], False), (" ", False), (turns[i + 1]["content"], False), ("\n", False)]
        return PromptText([*parts, (user_turn, False)])
    turns.append({"role": "user", "content": user_turn})
    if system is not None:
        conversation = [{"role": "system", "content": user_text(system, "system text")}, *turns]
        text = protocol.apply_chat_template([conversation], "custom")[0]
    else:
        text = protocol.apply_chat_template([turns], task.mode)[0]
    return PromptText([(text, False), (task.prefill, False)])


def conversation_prompt_text(
    messages: Sequence[dict[str, Any]], mode: str, add_generation_prompt: bool = True
) -> PromptText:
    """The prompt of a text conversation, as `conversation.prompt_text` makes it. Every content is user text
    (a --messages file included), except contents given as `PromptText.trusted`: the interactive session's
    own history, whose answers may hold the media mio generated."""
    from miocli.core.conversation import parse_messages, prompt_text

    text, images, speeches = prompt_text(parse_messages(messages), mode, add_generation_prompt)
    if images or speeches:
        raise UsageError("a conversation with media needs them encoded", hint="use Mio.conversation_prompt")
    return text


def raw_prompt_text(text: str, *, tokens: bool = False) -> PromptText:
    """A prompt without template, as the Base model takes it: BOS, then `text`.

    The text is user text unless `tokens` (`mio generate --raw-tokens`): then its token strings
    are tokens. A leading BOS string is taken as the BOS either way (it is what would be prepended).
    """
    body = text[len(protocol.BOS) :] if text.startswith(protocol.BOS) else text
    return PromptText([(protocol.BOS, False), (body, not tokens)])
