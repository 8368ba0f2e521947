"""The decodable-output rule, written once: a pure state machine over token ids.

Every engine adapts it to its own logits-processor interface (transformers' `LogitsProcessor` in
`miocli.engines.transformers_processors`, vLLM's in `miocli.engines.vllm_processor`). It needs no torch,
no tokenizer and no vLLM: a `Rule` is plain ids (`MediaVocabulary` looks them up in a tokenizer once),
and travels to a vLLM worker or a `vllm serve` as one JSON string (`Rule.to_json`) inside a request's
`extra_args` / `vllm_xargs`.

After `<image>` exactly 32 image tokens then `</image>`; after `<spch>` content tokens until the
model starts timbre0 (or the content cap), then exactly as many tokens in each timbre part, in
order, then `</spch>`. Outside segments, stray media tokens and closers are banned; a segment is
only opened when the budget leaves room to close it. `force_first` makes the answer open with a
given token (an image or speech task).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

from miocli import protocol

if TYPE_CHECKING:
    from miocli.model.tokenizer import MioTokenizer

TEXT, IMAGE, SPEECH = "text", "image", "speech"
# New tokens a whole segment takes: `<image>`, 32 ids, `</image>`; and the shortest speech,
# `<spch>`, one frame in each of the four parts (content, timbre0-2), `</spch>`.
IMAGE_SEGMENT_TOKENS = protocol.IMAGE_TOKENS_PER_IMAGE + 2
SHORTEST_SPEECH_TOKENS = 2 + protocol.SPEECH_LAYERS_IN_OUTPUT
# The key a rule travels under in vLLM's per-request arguments.
XARG = "mio_rule"
RULE_FORMAT = 1


@dataclass(frozen=True)
class SegmentState:
    """Where a row stands: in text, inside an image, or inside a speech segment (and which part)."""

    where: str = TEXT
    count: int = 0  # image tokens so far, or tokens in the current speech part
    part: int = 0  # speech: 0 content, 1..3 timbre parts
    content_length: int = 0  # speech: content tokens, fixed once timbre0 starts
    started: bool = False


@dataclass(frozen=True)
class Allowed:
    """The tokens a row may take next: `ids`, or every id but `ids` when `complement`.

    `key` names the set, so that an adapter can cache one mask per key (and device, width).
    """

    key: str
    ids: tuple[int, ...]
    complement: bool = False

    def mask(self, width: int) -> list[bool]:
        """A plain boolean mask over the first `width` ids (ids past it are ignored)."""
        inside = [self.complement] * width
        for i in self.ids:
            if i < width:
                inside[i] = not self.complement
        return inside


@dataclass(frozen=True)
class Rule:
    """The media token ids and one generation's settings: everything the rule needs."""

    image_begin: int
    image_end: int
    speech_begin: int
    speech_end: int
    image_ids: tuple[int, ...]
    speech_parts: tuple[tuple[int, ...], ...]
    max_new_tokens: int
    force_first: int | None = None
    allow_images: bool = True
    allow_speech: bool = True
    max_content_tokens: int | None = None
    start_in_image: bool = False
    _cache: dict[str, Allowed] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @cached_property
    def speech_part_of(self) -> dict[int, int]:
        return {tid: k for k, ids in enumerate(self.speech_parts) for tid in ids}

    @cached_property
    def media_ids(self) -> frozenset[int]:
        return frozenset(self.image_ids) | frozenset(self.speech_part_of)

    # ---- the state machine -------------------------------------------------------------------
    def initial(self) -> SegmentState:
        return SegmentState(IMAGE, started=True) if self.start_in_image else SegmentState()

    def advance(self, state: SegmentState, token: int) -> SegmentState:
        if state.where == TEXT:
            if token == self.image_begin:
                return SegmentState(IMAGE, started=True)
            if token == self.speech_begin:
                return SegmentState(SPEECH, started=True)
            return replace(state, started=True)
        if state.where == IMAGE:
            if token == self.image_end:
                return SegmentState(TEXT, started=True)
            return replace(state, count=state.count + 1)
        if token == self.speech_end:
            return SegmentState(TEXT, started=True)
        part = self.speech_part_of.get(token, state.part)
        if part == state.part:
            return replace(state, count=state.count + 1)
        content_length = state.count if state.part == 0 else state.content_length
        return replace(state, part=part, count=1, content_length=content_length)

    def state_after(self, tokens: Iterable[int], state: SegmentState | None = None) -> SegmentState:
        state = self.initial() if state is None else state
        for token in tokens:
            state = self.advance(state, int(token))
        return state

    def allowed(self, state: SegmentState, generated: int) -> Allowed:
        """What may follow `state` after `generated` new tokens."""
        remaining = self.max_new_tokens - generated
        if not state.started and self.force_first is not None:
            return self._set(f"only{self.force_first}", lambda: (self.force_first,))
        if state.where == IMAGE:
            if state.count < protocol.IMAGE_TOKENS_PER_IMAGE:
                return self._set("img", lambda: self.image_ids)
            return self._set("img_end", lambda: (self.image_end,))
        if state.where == SPEECH:
            return self._speech_allowed(state, remaining)
        # Opening a segment needs room to close it: 34 tokens for an image, 6 for the shortest speech.
        image_ok = self.allow_images and remaining >= IMAGE_SEGMENT_TOKENS
        speech_ok = self.allow_speech and remaining >= SHORTEST_SPEECH_TOKENS

        def banned() -> tuple[int, ...]:
            ids = set(self.media_ids) | {self.image_end, self.speech_end}
            if not image_ok:
                ids.add(self.image_begin)
            if not speech_ok:
                ids.add(self.speech_begin)
            return tuple(sorted(ids))

        return self._set(f"text_allowed:{image_ok}:{speech_ok}", banned, complement=True)

    def _speech_allowed(self, state: SegmentState, remaining: int) -> Allowed:
        parts = self.speech_parts
        if state.part == 0:
            if state.count == 0:
                return self._set("spch0", lambda: parts[0])
            # Another content token must leave room for three timbre parts of the new length
            # and the closer: 1 + 3 * (count + 1) + 1 tokens.
            can_extend = 3 * state.count + 5 <= remaining and (
                self.max_content_tokens is None or state.count < self.max_content_tokens
            )
            if not can_extend:
                return self._set("spch1", lambda: parts[1])
            return self._set("spch01", lambda: parts[0] + parts[1])
        if state.count < state.content_length:
            return self._set(f"spch{state.part}", lambda: parts[state.part])
        if state.part < len(parts) - 1:
            return self._set(f"spch{state.part + 1}", lambda: parts[state.part + 1])
        return self._set("spch_end", lambda: (self.speech_end,))

    def _set(self, key: str, ids: Any, complement: bool = False) -> Allowed:
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = Allowed(key, tuple(ids()), complement)
        return found

    # ---- travelling ----------------------------------------------------------------------------
    def to_json(self) -> str:
        """One compact string (id runs, not 12k ids): what a vLLM request carries."""
        data = {
            "format": RULE_FORMAT,
            "image_begin": self.image_begin, "image_end": self.image_end,
            "speech_begin": self.speech_begin, "speech_end": self.speech_end,
            "image_ids": _runs(self.image_ids), "speech_parts": [_runs(p) for p in self.speech_parts],
            "max_new_tokens": self.max_new_tokens, "force_first": self.force_first,
            "allow_images": self.allow_images, "allow_speech": self.allow_speech,
            "max_content_tokens": self.max_content_tokens, "start_in_image": self.start_in_image,
        }
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Rule:
        """The rule `to_json` wrote; ValueError for anything else (a server answers it with HTTP 400)."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("format") != RULE_FORMAT:
                raise ValueError(f"not a mio rule of format {RULE_FORMAT}")
            ints = ("image_begin", "image_end", "speech_begin", "speech_end", "max_new_tokens")
            if not all(isinstance(data[k], int) for k in ints):
                raise ValueError("token ids and max_new_tokens must be integers")
            optional = (data["force_first"], data["max_content_tokens"])
            if not all(v is None or isinstance(v, int) for v in optional):
                raise ValueError("force_first and max_content_tokens must be integers or null")
            return cls(
                image_begin=data["image_begin"], image_end=data["image_end"],
                speech_begin=data["speech_begin"], speech_end=data["speech_end"],
                image_ids=_unruns(data["image_ids"]),
                speech_parts=tuple(_unruns(p) for p in data["speech_parts"]),
                max_new_tokens=data["max_new_tokens"], force_first=data["force_first"],
                allow_images=bool(data["allow_images"]), allow_speech=bool(data["allow_speech"]),
                max_content_tokens=data["max_content_tokens"], start_in_image=bool(data["start_in_image"]),
            )
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"invalid {XARG}: {exc}") from None


def _runs(ids: Sequence[int]) -> list[list[int]]:
    """[[first, count], ...] for consecutive ids (MIO's media ids are one run per codebook)."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return runs


def _unruns(runs: Any) -> tuple[int, ...]:
    if not isinstance(runs, list) or not all(isinstance(r, list) and len(r) == 2 for r in runs):
        raise ValueError("id runs must be [[first, count], ...]")
    out: list[int] = []
    for first, count in runs:
        if not isinstance(first, int) or not isinstance(count, int) or first < 0 or count < 0:
            raise ValueError("id runs must hold non-negative integers")
        out.extend(range(first, first + count))
    return tuple(out)


def check_decodable(rule: Rule, tokens: Sequence[int], stopped: bool = True) -> list[str]:
    """Why `tokens` (one answer, stop token dropped) breaks the rule: [] when every step was allowed.

    For tests and for checking what a remote engine returned: replays the rule over the answer.
    A finished answer (`stopped`) must also not end inside a segment.
    """
    problems = []
    state = rule.initial()
    for n, token in enumerate(tokens):
        allowed = rule.allowed(state, n)
        if (token in allowed.ids) == allowed.complement:
            problems.append(f"token {n} ({token}) is not allowed in state {state.where}/{allowed.key}")
            break
        state = rule.advance(state, token)
    if not problems and stopped and state.where != TEXT:
        problems.append(f"the answer ends inside a {state.where} segment")
    return problems


class MediaVocabulary:
    """Ids of the multimodal tokens, looked up by string (never hard-coded)."""

    def __init__(self, tokenizer: MioTokenizer) -> None:
        self.image_begin = tokenizer.token_to_id(protocol.IMAGE_BEGIN)
        self.image_end = tokenizer.token_to_id(protocol.IMAGE_END)
        self.speech_begin = tokenizer.token_to_id(protocol.SPEECH_BEGIN)
        self.speech_end = tokenizer.token_to_id(protocol.SPEECH_END)
        self.image_ids = [tokenizer.token_to_id(f"<img{i}>") for i in range(protocol.IMAGE_CODEBOOK_SIZE)]
        size = protocol.SPEECH_CODEBOOK_SIZE
        self.speech_part_ids = [
            [tokenizer.token_to_id(f"<spch{k * size + i}>") for i in range(size)]
            for k in range(protocol.SPEECH_LAYERS_IN_OUTPUT)
        ]
        self.image_id_set = set(self.image_ids)
        self.speech_part_of = {tid: k for k, ids in enumerate(self.speech_part_ids) for tid in ids}
        self.vocab_size = tokenizer.vocab_size

    def rule(self, max_new_tokens: int, *, force_first: int | None = None, allow_images: bool = True,
             allow_speech: bool = True, max_content_tokens: int | None = None,
             start_in_image: bool = False) -> Rule:
        """The decodable-output rule over these ids for one generation."""
        return Rule(self.image_begin, self.image_end, self.speech_begin, self.speech_end, tuple(self.image_ids),
                    tuple(tuple(p) for p in self.speech_part_ids), max_new_tokens, force_first=force_first,
                    allow_images=allow_images, allow_speech=allow_speech, max_content_tokens=max_content_tokens,
                    start_in_image=start_in_image)
