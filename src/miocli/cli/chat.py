"""`mio chat` and `mio generate`: text in, text out (a conversation, or raw text for the Base model)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from miocli.cli.options import (
    Common,
    emit_json,
    err,
    with_options,
)
from miocli.cli.run import (
    expand_text_inputs,
    print_prompt,
    read_file,
    read_text_argument,
    report_problems,
    run_task,
)
from miocli.errors import UsageError


# ---- text commands ----------------------------------------------------------------------------
@with_options("runtime", "generation", "json", "prompt")
def chat(
    question: Annotated[str | None, typer.Argument(help="The question ('-' reads stdin).")] = None,
    mode: Annotated[str, typer.Option("--mode", help="std, voice or custom.")] = "std",
    system: Annotated[str | None, typer.Option("--system", help="System text (custom mode).")] = None,
    messages: Annotated[str | None, typer.Option("--messages", help="A JSON list of {role, content} turns "
                                                    "from FILE or '-' (contents are plain text: token "
                                                    "strings in them are not tokens).")] = None,
    no_generation_prompt: Annotated[bool, typer.Option("--no-generation-prompt", help="Do not open an "
                                                       "assistant turn at the end.")] = False,
    interactive: Annotated[bool, typer.Option("--interactive", "-i", help="Keep asking; history is kept.")] = False,
    *, opts: Common,
) -> int:
    """Chat with the Instruct model: one question, a whole conversation, or an interactive session."""
    if mode not in ("std", "voice", "custom"):
        raise UsageError(f"unknown --mode {mode!r}", hint="use std, voice or custom")
    if system is not None and mode != "custom":
        raise UsageError("--system needs --mode custom")
    from miocli.output.stdout import require_stdout

    require_stdout()
    if interactive and sys.stdin is None:
        raise UsageError("stdin is closed, so there is nothing to read in an interactive session",
                         hint="run it in a terminal, or give the question as an argument")
    options = opts.generation(batch_size=1)
    conversation = _conversation(question, messages, interactive)
    if opts.show_prompt:
        local = opts.make_mio(local=True)
        prompt_text = local.chat_prompt(conversation, mode=mode, system=system,
                                        add_generation_prompt=not no_generation_prompt)
        print_prompt(local, prompt_text, opts.as_json)
        return 0
    mio = opts.make_mio()
    if interactive:
        return _interactive(mio, conversation, mode, system, options, opts.as_json)
    shown = _Shown(not opts.as_json)
    reply = mio.chat(conversation, mode=mode, system=system, add_generation_prompt=not no_generation_prompt,
                     options=options, on_text=shown.piece if shown.live else None)
    report_problems("answer", reply.problems)
    if opts.as_json:
        emit_json({"task": "chat", "input": _last_user(conversation), **reply.to_record()})
    else:
        shown.done(reply.text)
    return 0


class _Shown:
    """An answer on stdout: on a terminal piece by piece as it is generated, else whole at its end."""

    def __init__(self, wanted: bool) -> None:
        self.live = wanted and sys.stdout is not None and sys.stdout.isatty()
        self.started = False

    def piece(self, text: str) -> None:
        self.started = True
        sys.stdout.write(text)
        sys.stdout.flush()

    def done(self, text: str) -> None:
        print("" if self.started else text, flush=True)
        self.started = False


def _conversation(question: str | None, messages: str | None, interactive: bool) -> list[dict[str, Any]]:
    turns: list[dict[str, Any]] = []
    if messages is not None:
        from miocli.core.inputs import read_stdin

        source = read_stdin("messages") if messages == "-" else read_file(messages)
        try:
            data = json.loads(source)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--messages {messages} is not valid JSON: {exc}") from None
        except RecursionError:
            raise UsageError(f"--messages {messages} is nested too deeply to be a list of turns") from None
        if not isinstance(data, list) or not data:
            raise UsageError(f"--messages {messages} should hold a non-empty JSON list of {{role, content}} turns")
        turns = data
    if question is None and messages is None and not interactive and sys.stdin is not None \
            and not sys.stdin.isatty():
        # `echo hi | mio chat`: piped text is the question, as if '-' were given; an empty pipe asks nothing.
        from miocli.core.inputs import read_stdin

        question = read_stdin("question")
        if not question.strip():
            question = None
    if question is not None:
        turns.append({"role": "user", "content": read_text_argument(question, "question")})
    if not turns and not interactive:
        raise UsageError("nothing to ask", hint="give a question (or pipe one), --messages FILE, or -i for a session")
    return turns


def _last_user(conversation: list[dict[str, Any]]) -> str:
    users = [t.get("content") for t in conversation if isinstance(t, dict) and t.get("role") == "user"]
    return str(users[-1]) if users else ""


def _interactive(mio: Any, history: list[dict[str, Any]], mode: str, system: str | None, options: Any,
                 as_json: bool) -> int:
    from miocli.protocol import PromptText

    err("mio: interactive chat; an empty line or Ctrl-D ends it.")
    pending = list(history)
    shown = _Shown(not as_json)
    on_text = shown.piece if shown.live else None
    if pending and pending[-1].get("role") == "user":
        reply = mio.chat(pending, mode=mode, system=system, options=options, on_text=on_text)
        pending.append({"role": "assistant", "content": PromptText.trusted(reply.raw.strip())})
        shown.done(reply.text)
    while True:
        line = _read_turn()
        if not line or not line.strip():
            return 0
        pending.append({"role": "user", "content": line.rstrip("\n")})
        reply = mio.chat(pending, mode=mode, system=system, options=options, on_text=on_text)
        report_problems("answer", reply.problems)
        # History keeps the raw answer so media the model produced stays in context: mio wrote those
        # token strings, so they stay tokens (trusted), while everything the user typed is plain text.
        pending.append({"role": "assistant", "content": PromptText.trusted(reply.raw.strip())})
        if as_json:
            emit_json({"task": "chat", "input": line.strip(), **reply.to_record()})
        else:
            shown.done(reply.text)


def _read_turn() -> str:
    """One typed line, after the prompt on the same line; on a terminal with line editing and history."""
    if sys.stdin.isatty() and sys.stdout.isatty():
        # readline: arrow keys edit the line, up recalls earlier turns (importing it costs about 1 ms).
        import readline  # noqa: F401

        try:
            return input("you> ") + "\n"
        except EOFError:
            return ""
    sys.stderr.write("you> ")
    sys.stderr.flush()
    return sys.stdin.readline()


@with_options("runtime", "ray", "generation", "batch", "json", "prompt", "output")
def generate(
    prompts: Annotated[list[str], typer.Argument(help="Raw prompts ('-' reads one prompt per line from stdin).")],
    raw_tokens: Annotated[bool, typer.Option("--raw-tokens", help="For hand-built prompts: read token strings "
                                             "(<|im_start|>, <image>, <img5>, <spch5>, ...) in the prompts as "
                                             "the tokens they name. Without it prompts are plain text.")] = False,
    *, opts: Common,
) -> int:
    """Continue raw text with no chat template (the Base model's way; BOS is prepended).

    Prompts are plain text: a token string typed in one is text, not a token, unless --raw-tokens.
    """
    from miocli.core.inputs import Item
    from miocli.core.prompts import raw_prompt_text
    from miocli.output.files import slug
    from miocli.output.writer import GENERATE, Target

    texts = expand_text_inputs(prompts, "prompt")
    targets = [Target(Item(text, prompt=raw_prompt_text(text, tokens=raw_tokens)),
                      f"{number:03d}-{slug(text, 30)}") for number, text in enumerate(texts, start=1)]
    return run_task("generate", "generate", GENERATE, targets, opts)
