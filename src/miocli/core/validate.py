"""Checks of values a user gives, made before anything loads: each failure is one UsageError line (exit 2).

The CLI calls these on its arguments as soon as it has them; the API reaches the same checks
through the objects that carry the values (PixelOptions, the prompt builders), so both refuse
the same things with the same words. Import-light: `mio --help` loads the CLI, which imports this.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from typing import Any

from miocli.errors import UsageError

# Seeds feed torch generators, which take unsigned 64-bit numbers.
MAX_SEED = 2**64 - 1
# The unCLIP decoder (SD 2.1) works at 768 and takes sides in multiples of 64 (VAE factor 8 times the
# UNet's three halvings). Memory and time grow with the square of the side: 2048 is already 7x the work.
IMAGE_SIZE_MULTIPLE = 64
MAX_IMAGE_SIZE = 2048
# The DDIM scheduler refuses more steps than its 1000 training timesteps.
MAX_STEPS = 1000

_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(value: str, what: str) -> None:
    """UsageError when `value` is not valid text, naming the first bad byte.

    Python hands undecodable bytes of arguments (and of stdin in UTF-8 mode) over as lone
    surrogates, which the tokenizer cannot encode; JSON's \\ud800 escapes give them too.
    """
    bad = _SURROGATE.search(value)
    if bad is None:
        return
    code = ord(bad.group())
    where = f"at character {bad.start() + 1}"
    if 0xDC80 <= code <= 0xDCFF:
        problem = f"the byte 0x{code - 0xDC00:02x} {where} is not UTF-8"
    else:
        problem = f"it holds the lone surrogate U+{code:04X} {where}"
    raise UsageError(f"the {what} is not valid UTF-8 text: {problem}", hint="pass UTF-8 text (convert with iconv)")


def check_seed(seed: Any, what: str = "--seed") -> None:
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise UsageError(f"{what} must be a whole number from 0 to {MAX_SEED} (2**64 - 1), not {seed!r}")


def check_pixels(steps: Any, guidance: Any, size: Any) -> None:
    """The unCLIP settings (--steps, --guidance, --size), checked before any image is generated.

    A size of None is the decoder's own; the decoder checks it against its own rule once loaded.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise UsageError(f"--steps must be a whole number from 1 to {MAX_STEPS}, not {steps!r}",
                         hint="the reference uses 20")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) \
            or guidance < 0:
        raise UsageError(f"--guidance must be a finite number of at least 0, not {guidance!r}",
                         hint="the reference uses 10")
    if size is None:
        return
    if isinstance(size, bool) or not isinstance(size, int):
        raise UsageError(f"--size must be a whole number of pixels, not {size!r}")
    if size > MAX_IMAGE_SIZE:
        raise UsageError(f"--size {size} is too large: at most {MAX_IMAGE_SIZE}",
                         hint="the decoder works at 768; memory and time grow with the square of the side")
    if size < IMAGE_SIZE_MULTIPLE or size % IMAGE_SIZE_MULTIPLE:
        nearest = min(max(IMAGE_SIZE_MULTIPLE, round(size / IMAGE_SIZE_MULTIPLE) * IMAGE_SIZE_MULTIPLE),
                      MAX_IMAGE_SIZE)
        raise UsageError(f"--size must be a multiple of {IMAGE_SIZE_MULTIPLE} from {IMAGE_SIZE_MULTIPLE} to "
                         f"{MAX_IMAGE_SIZE}, not {size}", hint=f"use e.g. {nearest} (the reference uses 768)")


def template_fields(template: str, what: str) -> list[tuple[str, str | None]]:
    """A str.format template as (literal text, field name or None) pairs.

    Only plain named fields ({media}) are allowed: positional, indexed, attribute, converted or
    formatted fields would reach into Python objects rather than fill text.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise UsageError(f"{what} is not a valid template: {exc}",
                         hint="write a literal brace as {{ or }}") from None
    result: list[tuple[str, str | None]] = []
    for literal, name, spec, conversion in parsed:
        if name is not None and (not name.isidentifier() or spec or conversion):
            field = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise UsageError(f"{what} has the field {field}; only plain names such as {{media}} are filled",
                             hint="write a literal brace as {{ or }}")
        result.append((literal, name))
    return result


def check_template(template: str, names: Sequence[str], what: str = "--template") -> None:
    """A user's prompt template: valid, naming only `names`, each at least once and {media} exactly once."""
    check_text(template, what)
    used = [name for _, name in template_fields(template, what) if name is not None]
    allowed = ", ".join("{" + name + "}" for name in names)
    unknown = [name for name in used if name not in names]
    if unknown:
        raise UsageError(f"{what} names {{{unknown[0]}}}, which is not filled; it can use {allowed}",
                         hint="write a literal brace as {{ or }}")
    missing = [name for name in names if name not in used]
    if missing:
        raise UsageError(f"{what} needs {allowed} (missing {{{missing[0]}}})")
    if used.count("media") > 1:
        raise UsageError(f"{what} names {{media}} {used.count('media')} times; it must place the media once")
