"""The MIO prompt protocol: chat template, placeholders, token strings, output parsing.

Everything here is plain string and list work with no model library, so prompts can be
printed (`--print-prompt`) and outputs parsed without loading any weights. The constants are
the strings MIO was trained on and must stay byte for byte as they are (MIO_PROTOCOL §2–§6).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

STD_SYSTEM = (
    "You are MIO, an AI assistant capable of understanding and generating images, text, videos, "
    "and speech, selecting the appropriate modality according to the context."
)
VOICE_SYSTEM = (
    "You are MIO, an AI assistant capable of understanding images, text, videos, and speech, and "
    "generating speech. Please respond to the user with speech only, starting with <spch> and ending with </spch>."
)
MODES = ("std", "voice", "custom")

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
UNK = "<unk>"
ASSISTANT_STARTER = f"{IM_START}assistant\n"
TURN_SEPARATOR = "\n"

IMAGE_BEGIN, IMAGE_END = "<image>", "</image>"
SPEECH_BEGIN, SPEECH_END = "<spch>", "</spch>"
IMAGE_CODEBOOK_SIZE = 8192
IMAGE_TOKENS_PER_IMAGE = 32
SPEECH_CODEBOOK_SIZE = 1024
SPEECH_LAYERS_IN_OUTPUT = 4
SPEECH_PART_NAMES = ("content", "timbre0", "timbre1", "timbre2")

_TURN_FORMAT = {
    "system": f"{IM_START}system\n{{}}{IM_END}",
    "user": f"{IM_START}user\n{{}}{IM_END}",
    "assistant": f"{IM_START}assistant\n{{}}{IM_END}",
}


class PromptText(str):
    """Prompt text that knows which of its characters are user text.

    Prompts are built as text and tokenized in one go, and the tokenizer reads any special-token
    string (`<|im_end|>`, `<img5>`, `<spch>`) as that token. User text (questions, captions,
    conversation turns, raw prompts) must not be able to write tokens or address placeholders:
    its spans are listed in `plain`, and there the characters are encoded as what they are and
    placeholders are left alone. Everything else — the chat template, the task templates, media
    token strings, in-context examples, or text marked `trusted` on purpose — is read as the
    reference reads it. A PromptText is a str, so it prints and compares as its text.

    Concatenating a plain str adds trusted text (code writes the template, not the user);
    other str operations give a bare str without the marks.
    """

    plain: tuple[tuple[int, int], ...]

    def __new__(cls, parts: Iterable[tuple[str, bool]] = ()) -> PromptText:
        """Text from (text, is_user_text) parts; a PromptText part that is not user text keeps its own marks."""
        texts: list[str] = []
        spans: list[tuple[int, int]] = []
        position = 0
        for text, is_plain in parts:
            if is_plain:
                spans.append((position, position + len(text)))
            elif isinstance(text, PromptText):
                spans.extend((position + start, position + end) for start, end in text.plain)
            texts.append(text)
            position += len(text)
        self = super().__new__(cls, "".join(texts))
        merged: list[tuple[int, int]] = []
        for start, end in spans:
            if start == end:
                continue
            if merged and merged[-1][1] >= start:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        self.plain = tuple(merged)
        return self

    @classmethod
    def user(cls, text: str) -> PromptText:
        """All user text: encoded as its characters."""
        return cls([(text, True)])

    @classmethod
    def trusted(cls, text: str) -> PromptText:
        """Text whose token strings are tokens (the opt-in for hand-built prompts and mio's own output)."""
        return cls([(text, False)])

    def parts(self) -> list[tuple[str, bool]]:
        """The text as alternating (text, is_user_text) runs."""
        result: list[tuple[str, bool]] = []
        position = 0
        for start, end in self.plain:
            if start > position:
                result.append((self[position:start], False))
            result.append((self[start:end], True))
            position = end
        if position < len(self):
            result.append((self[position:], False))
        return result

    def starts_with_trusted(self, prefix: str) -> bool:
        """True when the text starts with `prefix` written by the template, not typed by the user."""
        return self.startswith(prefix) and not (self.plain and self.plain[0][0] < len(prefix))

    def __add__(self, other: str) -> PromptText:  # type: ignore[override]
        if not isinstance(other, str):
            return NotImplemented
        return PromptText([(self, False), (other, False)])

    def __radd__(self, other: str) -> PromptText:
        if not isinstance(other, str):
            return NotImplemented
        return PromptText([(other, False), (self, False)])

    def __reduce__(self) -> tuple[Any, ...]:
        # str's own pickling would rebuild from the bare text and lose the marks.
        return (PromptText, (self.parts(),))

    def __repr__(self) -> str:
        return f"PromptText({self.parts()!r})"


def image_placeholder(index: int) -> str:
    return f"<image_placeholder_{index}>"


def speech_placeholder(index: int) -> str:
    return f"<speech_placeholder_{index}>"


# ---- chat template ---------------------------------------------------------------------------
def apply_chat_template(
    conversations: Sequence[Sequence[dict[str, Any]]],
    mode: str = "std",
    *,
    add_generation_prompt: bool = True,
    add_bos: bool = True,
) -> list[str]:
    """One prompt string per conversation (a list of {"role", "content"} turns).

    Placeholders are left as they are; `fill_placeholders` puts the media token strings in.
    Errors follow the reference's types and messages, which scripts may already match on.
    """
    if mode not in MODES:
        raise ValueError(
            f"Unknown mode: {mode}, must choose from ['std', 'voice'].\n"
            f"The std system is: {STD_SYSTEM}\nThe voice system is: {VOICE_SYSTEM}"
        )
    prompts: list[str] = []
    for conversation in conversations:
        if mode == "custom":
            if not conversation or conversation[0]["role"] != "system":
                raise AssertionError("In custom mode, the first turn must be the system.")
            system = conversation[0]["content"]
        else:
            system = STD_SYSTEM if mode == "std" else VOICE_SYSTEM
        parts = [_turn("system", system)]
        for turn in conversation:
            role = turn["role"]
            if role == "system":
                continue
            if role not in ("user", "assistant"):
                raise ValueError(f"Unknown role: {role}")
            parts.append(_turn(role, turn["content"]))
        pieces = [BOS] if add_bos else []
        for part in parts:
            pieces += [part, TURN_SEPARATOR]
        if add_generation_prompt:
            pieces.append(ASSISTANT_STARTER)
        else:
            pieces.pop()
        # Contents given as PromptText keep their user-text marks; plain contents give the reference's plain str.
        if any(isinstance(piece, PromptText) for piece in pieces):
            prompts.append(PromptText([(piece, False) for piece in pieces]))
        else:
            prompts.append("".join(pieces))
    return prompts


def _turn(role: str, content: Any) -> str:
    if isinstance(content, PromptText):
        return PromptText([(f"{IM_START}{role}\n", False), (content, False), (IM_END, False)])
    return _TURN_FORMAT[role].format(content)


def fill_placeholders(text: str, image_strings: Sequence[str] = (), speech_strings: Sequence[str] = ()) -> str:
    """Replace every `<image_placeholder_j>` / `<speech_placeholder_j>` by the j-th token string.

    In a PromptText only the trusted text is filled: a placeholder typed by the user stays text.
    """
    if isinstance(text, PromptText):
        return PromptText([(part if is_plain else fill_placeholders(part, image_strings, speech_strings), is_plain)
                           for part, is_plain in text.parts()])
    for j, token_string in enumerate(image_strings):
        text = text.replace(image_placeholder(j), token_string)
    for j, token_string in enumerate(speech_strings):
        text = text.replace(speech_placeholder(j), token_string)
    return text


class Tokenizer(Protocol):
    """What `encode_prompts` asks of a tokenizer (`miocli.model.tokenizer.MioTokenizer` is one)."""

    def __call__(self, texts: list[str], *, padding: bool = False, truncation: bool = False,
                 max_length: int | None = None,
                 plain: Sequence[Sequence[tuple[int, int]]] | None = None) -> dict[str, list[list[int]]]: ...


def encode_prompts(
    tokenizer: Tokenizer,
    texts: Sequence[str],
    *,
    batch_image_strings: Sequence[Sequence[str]] | None = None,
    batch_speech_strings: Sequence[Sequence[str]] | None = None,
    add_bos: bool = True,
    padding: bool = True,
    truncation: bool = False,
    max_length: int | None = None,
) -> dict[str, list[list[int]]]:
    """Token ids of prompts with their media filled in, left-padded like the reference.

    A PromptText's user text is encoded as its characters (see PromptText); a bare str as the reference does.
    """
    filled: list[str] = []
    for i, text in enumerate(texts):
        images: Sequence[str] = ()
        if batch_image_strings is not None:
            images = batch_image_strings[i]
            # The reference reads the first image of every sample it is handed media for; an
            # empty list there is an error in it, kept so both accept the same inputs.
            images[0]  # noqa: B018
        speeches = batch_speech_strings[i] if batch_speech_strings is not None else ()
        text = fill_placeholders(text, images, speeches)
        # A BOS string the user typed is text, not the BOS.
        has_bos = text.starts_with_trusted(BOS) if isinstance(text, PromptText) else text.startswith(BOS)
        if add_bos and not has_bos:
            text = BOS + text
        filled.append(text)
    plain = [text.plain if isinstance(text, PromptText) else () for text in filled]
    return tokenizer(filled, padding=padding, truncation=truncation, max_length=max_length, plain=plain)


# ---- token strings ---------------------------------------------------------------------------
def image_ids_to_string(ids: Sequence[int], *, add_begin_end: bool = True) -> str:
    body = "".join(f"<img{int(i)}>" for i in ids)
    return f"{IMAGE_BEGIN}{body}{IMAGE_END}" if add_begin_end else body


def speech_codes_to_string(
    codes: Sequence[Sequence[int]], *, with_timbre: bool, add_begin_end: bool = True
) -> str:
    """Token string of speech codes given as layers × frames (layer 0 = content).

    Content only for understanding; with timbre, layers 0–3 one after the other, layer k
    shifted by 1024·k. Without begin/end markers the reference joins content tokens with
    spaces but timbre tokens without: reproduced because callers may depend on it.
    """
    layers = SPEECH_LAYERS_IN_OUTPUT if with_timbre else 1
    if len(codes) < layers:
        raise ValueError(f"need {layers} layers of speech codes, got {len(codes)}")
    tokens = [
        f"<spch{int(code) + SPEECH_CODEBOOK_SIZE * k}>" for k in range(layers) for code in codes[k]
    ]
    if add_begin_end:
        return SPEECH_BEGIN + "".join(tokens) + SPEECH_END
    return ("" if with_timbre else " ").join(tokens)


_IMAGE_SEGMENT = re.compile(r"<image>\s*(?:<img\d+>\s*)+\s*</image>")
_SPEECH_SEGMENT = re.compile(r"<spch>\s*(?:<spch\d+>\s*)+\s*</spch>")
_SPEECH_TOKEN = re.compile(r"<spch(\d+)>")
_DIGITS = re.compile(r"\d+")


def image_ids_from_string(segment: str) -> list[int]:
    """Ids of an image segment: every run of digits inside it, as the reference reads them."""
    return [int(digits) for digits in _DIGITS.findall(segment)]


def speech_part_of(number: int) -> str:
    if 0 <= number < SPEECH_CODEBOOK_SIZE * SPEECH_LAYERS_IN_OUTPUT:
        return SPEECH_PART_NAMES[number // SPEECH_CODEBOOK_SIZE]
    raise ValueError(f"Token number <spch{number}> out of valid ranges of speech tokens.")


def check_speech_completeness(segment: str) -> bool:
    """True when a speech string has content, timbre0, timbre1, timbre2 parts of equal length.

    Raises ValueError otherwise, with the reference's messages (checked in its order:
    number of parts, then order, then lengths).
    """
    numbers = [int(digits) for digits in _SPEECH_TOKEN.findall(segment)]
    if not numbers:
        raise ValueError("Cannot found <spch\\d+> tokens")
    parts: list[str] = []
    lengths: list[int] = []
    for number in numbers:
        part = speech_part_of(number)
        if parts and parts[-1] == part:
            lengths[-1] += 1
        else:
            parts.append(part)
            lengths.append(1)
    if len(parts) != SPEECH_LAYERS_IN_OUTPUT:
        raise ValueError(f"Must have exactly four parts in the speech tokens, only found {parts}")
    for k, (part, expected) in enumerate(zip(parts, SPEECH_PART_NAMES)):
        if part != expected:
            raise ValueError(
                f"Part {k} is expected to be {expected}, but found {part}. "
                f"Parts are not in the correct order: {parts}"
            )
    if len(set(lengths)) != 1:
        raise ValueError(f"Each part must have the same number of tokens, but found {lengths}.")
    return True


def speech_codes_from_string(segment: str) -> list[list[int]]:
    """Codes (4 layers × frames) of a complete speech segment, offsets removed.

    Unlike the reference, tokens are found by pattern rather than by splitting on spaces, so
    a segment mixing touching and spaced tokens decodes instead of failing.
    """
    check_speech_completeness(segment)
    numbers = [int(digits) for digits in _SPEECH_TOKEN.findall(segment)]
    frames = len(numbers) // SPEECH_LAYERS_IN_OUTPUT
    return [
        [n - SPEECH_CODEBOOK_SIZE * k for n in numbers[k * frames : (k + 1) * frames]]
        for k in range(SPEECH_LAYERS_IN_OUTPUT)
    ]


def speech_content_from_string(segment: str) -> list[int]:
    """Content codes (layer 0) of any speech string: understanding inputs carry only those."""
    return [n for n in (int(d) for d in _SPEECH_TOKEN.findall(segment)) if n < SPEECH_CODEBOOK_SIZE]


# ---- reading the output ----------------------------------------------------------------------
def extract_assistant(text: str) -> str:
    """The last assistant reply: text after the last assistant starter, markers removed, stripped."""
    position = text.rfind(ASSISTANT_STARTER)
    if position >= 0:
        text = text[position + len(ASSISTANT_STARTER) :]
    return text.replace(IM_END, "").replace(UNK, "").strip()


@dataclass
class ImageSegment:
    raw: str
    ids: list[int]


@dataclass
class SpeechSegment:
    raw: str
    codes: list[list[int]]


@dataclass
class BadSegment:
    """A segment that cannot be decoded; the rest of the output is kept."""

    kind: str
    raw: str
    reason: str


@dataclass
class ParsedOutput:
    text: str
    images: list[ImageSegment] = field(default_factory=list)
    speeches: list[SpeechSegment] = field(default_factory=list)
    problems: list[BadSegment] = field(default_factory=list)


def parse_output(
    text: str,
    *,
    extract: bool = True,
    take_images: bool = True,
    take_speeches: bool = True,
    image_tokens: int | None = IMAGE_TOKENS_PER_IMAGE,
) -> ParsedOutput:
    """Split one decoded output into text with placeholders and its media segments.

    Image segments are taken first, then speech, each replaced left to right by its
    placeholder (numbered per kind from 0). A malformed segment stays in the text as it is and
    is reported in `problems`, the rest is kept: a speech segment that fails
    `check_speech_completeness` (the reference raises and loses everything), and an image
    segment without exactly `image_tokens` ids (the image decoder cannot take it). With
    `image_tokens=None` every image segment is taken, whatever its length, as the reference does.
    """
    if extract:
        text = extract_assistant(text)
    parsed = ParsedOutput(text=text)
    if take_images:
        for match in _IMAGE_SEGMENT.finditer(text):
            raw = match.group(0)
            ids = image_ids_from_string(raw)
            if image_tokens is not None and len(ids) != image_tokens:
                reason = f"an image needs exactly {image_tokens} image tokens, found {len(ids)}"
                parsed.problems.append(BadSegment(kind="image", raw=raw, reason=reason))
                continue
            parsed.text = parsed.text.replace(raw, image_placeholder(len(parsed.images)), 1)
            parsed.images.append(ImageSegment(raw=raw, ids=ids))
    if take_speeches:
        for match in _SPEECH_SEGMENT.finditer(parsed.text):
            raw = match.group(0)
            try:
                codes = speech_codes_from_string(raw)
            except ValueError as exc:
                parsed.problems.append(BadSegment(kind="speech", raw=raw, reason=str(exc)))
                continue
            parsed.speeches.append(SpeechSegment(raw=raw, codes=codes))
        for index, segment in enumerate(parsed.speeches):
            parsed.text = parsed.text.replace(segment.raw, speech_placeholder(index), 1)
    return parsed
