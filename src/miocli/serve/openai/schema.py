"""The OpenAI request bodies as pydantic models: strict JSON types and OpenAI's ranges, OpenAI's errors.

JSON bodies are validated strictly (`"5"` is not a number, `3.5` is not a temperature); multipart form
fields are text by nature and are validated in pydantic's lax mode (`"5"` is 5 there). The first problem
becomes an OpenAI-shaped 400 naming the parameter, with OpenAI's error codes (`invalid_type`,
`integer_above_max_value`, `unknown_parameter`, `missing_required_parameter`, …). What the fields mean
for MIO (presets, sampling) is the endpoint modules' business.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from miocli.serve.openai.protocol import MAX_BEAMS, MAX_IMAGES, OpenAIError

Request = TypeVar("Request", bound="Strict")


class Strict(BaseModel):
    # Unknown fields are refused (a typo must not silently fall back to a default).
    model_config = ConfigDict(extra="forbid", strict=True)
    # Accepted and ignored: the client's account and hints MIO has no control for.
    user: Any = None
    store: Any = None
    metadata: Any = None
    service_tier: Any = None
    safety_identifier: Any = None
    prompt_cache_key: Any = None


class Generation(Strict):
    """MIO's own settings, on every endpoint (openai SDK: `extra_body`)."""

    seed: int | None = None
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    beams: int | None = Field(None, ge=1, le=MAX_BEAMS)
    sample: bool | None = None
    repetition_penalty: float | None = Field(None, gt=0)
    constrain: bool | None = None

    def mio_settings(self, **known: Any) -> dict[str, Any]:
        """The settings for the core, OpenAI's sampling knobs in MIO's terms: temperature 0 is greedy,
        above 0 (or a top_p) samples; without either the task keeps its preset (beam search for text,
        as the CLI does). The core checks the rest of the ranges before queueing (`check_plan`)."""
        names = set(Generation.model_fields) - set(Strict.model_fields)
        settings = {k: v for k, v in self.model_dump(include=names).items() if v is not None}
        settings.update(known)
        temperature = settings.pop("temperature", None)
        if "sample" not in settings and (temperature is not None or "top_p" in settings):
            settings["sample"] = temperature != 0
        if temperature:
            settings["temperature"] = temperature
        return settings


class StreamOptions(Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class ChatAudio(Strict):
    format: Literal["wav", "flac"] = "wav"
    voice: Any = None  # MIO speaks in one voice, chosen by the model


class ChatRequest(Generation):
    model: str
    messages: list[Any] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    modalities: list[Literal["text", "audio"]] | None = Field(None, min_length=1)
    audio: ChatAudio | None = None
    # MIO's own: how pictures in an answer are drawn (unCLIP steps, guidance, side in pixels).
    steps: int | None = Field(None, ge=1)
    guidance: float | None = None
    size: int | None = Field(None, ge=1)
    # Accepted at their "off" values only (chat.refuse_features).
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    response_format: Any = None
    stop: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    verbosity: Any = None


class ImageRequest(Generation):
    model: str | None = None
    prompt: str
    n: int = Field(1, ge=1, le=MAX_IMAGES)
    size: str | None = None
    response_format: Literal["b64_json"] = "b64_json"
    output_format: Literal["png"] = "png"
    quality: Any = None  # OpenAI's own models' variants
    style: Any = None
    steps: int | None = Field(None, ge=1)
    guidance: float | None = None


class SpeechRequest(Generation):
    model: str
    input: str
    response_format: Literal["wav", "flac"] = "wav"
    speed: float = Field(1.0, ge=1.0, le=1.0)
    stream_format: Literal["audio"] = "audio"
    voice: Any = None  # MIO speaks in one voice, chosen by the model
    instructions: Any = None


class TranscriptionRequest(Generation):
    model: str
    response_format: Literal["json", "text", "verbose_json", "srt", "vtt"] = "json"
    stream: Literal[False] = False
    prompt: Any = None  # a style hint for Whisper: MIO's transcription prompt has none
    language: str | None = None  # MIO transcribes the recording's own language


def parse(kind: type[Request], body: dict[str, Any], *, form: bool = False) -> Request:
    """The body as `kind`, or the first problem as an OpenAI 400."""
    try:
        return kind.model_validate(body, strict=not form)
    except ValidationError as exc:
        raise openai_error(exc.errors()[0], form) from None


_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "a boolean", "string": "a string",
               "list": "an array", "dict": "an object", "model": "an object"}


def openai_error(error: Any, form: bool = False) -> OpenAIError:
    """One pydantic error in OpenAI's words."""
    loc = [str(p) for p in error.get("loc", ())]
    param = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc).lstrip(".") or None
    kind, value, ctx = error.get("type", ""), error.get("input"), error.get("ctx") or {}
    if kind == "extra_forbidden":
        return OpenAIError(f"unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    if kind == "missing":
        return OpenAIError(f"missing required parameter: '{param}'", param=param, code="missing_required_parameter")
    if kind.endswith("_type") or kind.endswith("_parsing") or kind == "model_attributes_type":
        expected = _TYPE_NAMES.get(kind.split("_")[0], "another type")
        given = "text" if form else type(value).__name__.replace("str", "a string").replace("NoneType", "null")
        return OpenAIError(f"invalid type for '{param}': expected {expected}, but got {given} instead", param=param,
                           code="invalid_type")
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        above = kind.startswith("less")
        limit = next(iter(ctx.values()), None)
        number = "integer" if isinstance(value, int) and not isinstance(value, bool) else "decimal"
        side = f"{'above maximum' if above else 'below minimum'} value"
        relation = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        code = f"{number}_{'above_max' if above else 'below_min'}_value"
        return OpenAIError(f"invalid '{param}': {number} {side}; expected a value {relation} {limit}, but got "
                           f"{value} instead", param=param, code=code)
    if kind == "too_short":
        return OpenAIError(f"invalid '{param}': empty array; expected at least one item", param=param,
                           code="empty_array")
    if kind == "literal_error":
        return OpenAIError(f"invalid value for '{param}': {value!r}; supported values are {ctx.get('expected')}",
                           param=param, code="unsupported_value")
    return OpenAIError(f"invalid '{param}': {error.get('msg', 'bad value')}", param=param, code="invalid_value")
