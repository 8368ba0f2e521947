"""`mio chat` and `mio generate`: text in, text out (a conversation, or raw text for the Base model)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from miocli.cli.options import (
    Common,
    GuidanceOpt,
    SizeOpt,
    StepsOpt,
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
    attach: Annotated[list[str] | None, typer.Option("--attach", "-a", help="An image, recording or video for the "
                                                     "question (repeatable; its kind is read from its "
                                                     "content).")] = None,
    mode: Annotated[str, typer.Option("--mode", help="std, voice or custom.")] = "std",
    system: Annotated[str | None, typer.Option("--system", help="System text (custom mode).")] = None,
    messages: Annotated[str | None, typer.Option("--messages", help="A JSON list of {role, content} turns "
                                                    "from FILE or '-'; a content is text or a list of parts "
                                                    "({type: text|image|audio|video, path} or OpenAI's "
                                                    "image_url/input_audio). Text is plain text: token "
                                                    "strings in it are not tokens.")] = None,
    output_dir: Annotated[Path | None, typer.Option("--output-dir", "-o", help="Where pictures and speech in "
                                                    "answers go (default: a new mio-chat-DATE-TIME folder; "
                                                    "nothing is overwritten).")] = None,
    max_history: Annotated[int | None, typer.Option("--max-history", help="Keep at most N earlier turns, and drop "
                                                    "the oldest ones when the conversation would pass the "
                                                    "context (without it, that is an error).")] = None,
    no_generation_prompt: Annotated[bool, typer.Option("--no-generation-prompt", help="Do not open an "
                                                       "assistant turn at the end.")] = False,
    interactive: Annotated[bool, typer.Option("--interactive", "-i", help="Keep asking; history is kept. "
                                              "Commands: /attach PATH, /save FILE, /reset.")] = False,
    steps: StepsOpt = 20, guidance: GuidanceOpt = 10.0, size: SizeOpt = 768,
    *, opts: Common,
) -> int:
    """Chat with the Instruct model: one question, a whole conversation, or an interactive session;
    images, recordings and videos in any turn, pictures and speech in answers written as files."""
    if mode not in ("std", "voice", "custom"):
        raise UsageError(f"unknown --mode {mode!r}", hint="use std, voice or custom")
    if system is not None and mode != "custom":
        raise UsageError("--system needs --mode custom")
    if max_history is not None and max_history < 0:
        raise UsageError("--max-history must be 0 or more")
    from miocli.output.stdout import require_stdout

    require_stdout()
    if interactive and sys.stdin is None:
        raise UsageError("stdin is closed, so there is nothing to read in an interactive session",
                         hint="run it in a terminal, or give the question as an argument")
    options = opts.generation(batch_size=1)
    conversation = _conversation(question, messages, attach or [], interactive)
    if opts.show_prompt:
        local = opts.make_mio(local=True)
        prompt = local.conversation_prompt(conversation, mode=mode, system=system,
                                           add_generation_prompt=not no_generation_prompt)
        print_prompt(local, prompt.text, opts.as_json, image_strings=prompt.image_strings,
                     speech_strings=prompt.speech_strings)
        return 0
    from miocli.core.mediatokens import PixelOptions
    from miocli.output.chatfiles import AnswerFiles

    PixelOptions(steps, guidance, size)  # checked before anything loads
    session = _Session(opts.make_mio(), mode, system, options, opts.as_json, AnswerFiles(output_dir), max_history,
                       {"steps": steps, "guidance": guidance, "size": size})
    if interactive:
        return session.interactive(conversation)
    session.history = conversation
    session.answer(add_generation_prompt=not no_generation_prompt)
    return 0


# The pieces come from TextDeltas: a picture or speech shows there as its whole placeholder, once complete.
_PLACEHOLDER = re.compile(r"<(image|speech)_placeholder_\d+>")


class _Shown:
    """An answer on stdout: on a terminal piece by piece as it is generated, its pictures and speech listed
    with their files at its end; else whole, each picture and recording replaced by where it went."""

    def __init__(self, wanted: bool) -> None:
        self.live = wanted and sys.stdout is not None and sys.stdout.isatty()
        self.started = False

    def piece(self, text: str) -> None:
        self.started = True
        sys.stdout.write(_PLACEHOLDER.sub("", text))
        sys.stdout.flush()

    def done(self, text: str, files: list[str]) -> None:
        if self.started:
            print("", flush=True)
            for path in files:
                print(f"[{'audio' if path.endswith('.wav') else 'image'}: {path}]", flush=True)
        else:
            print(text, flush=True)
        self.started = False


def _conversation(question: str | None, messages: str | None, attach: list[str], interactive: bool) -> list[Any]:
    from miocli.core.conversation import Part, Turn, attachment, parse_messages

    turns: list[Any] = []
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
        # Paths in a messages file are relative to the file, as they were when it was saved.
        turns = parse_messages(data, None if messages == "-" else Path(messages).resolve().parent)
    if question is None and messages is None and not interactive and sys.stdin is not None \
            and not sys.stdin.isatty():
        # `echo hi | mio chat`: piped text is the question, as if '-' were given; an empty pipe asks nothing.
        from miocli.core.inputs import read_stdin

        question = read_stdin("question")
        if not question.strip():
            question = None
    parts = [] if question is None else [Part("text", text=read_text_argument(question, "question"))]
    # Attachments come after the question, as in the reference's own example turn.
    for path in attach:
        media = attachment(path, f"--attach (message {len(turns)})")
        parts.append(Part(media.kind, media=media, path=path))
    if parts:
        turns.append(Turn("user", parts))
    if not turns and not interactive:
        raise UsageError("nothing to ask", hint="give a question (or pipe one), --messages FILE, or -i for a session")
    return turns


class _Session:
    """One conversation: its turns (media tokens kept), where media answers go, how answers are shown."""

    def __init__(self, mio: Any, mode: str, system: str | None, options: Any, as_json: bool, files: Any,
                 max_history: int | None, pixels: dict[str, Any]) -> None:
        self.mio, self.mode, self.system, self.options, self.pixels = mio, mode, system, options, pixels
        self.as_json, self.files, self.max_history = as_json, files, max_history
        self.history: list[Any] = []
        self.answers = 0
        self.shown = _Shown(not as_json)

    def answer(self, add_generation_prompt: bool = True) -> None:
        """Answer the history's last turn, show it, and keep it in the history."""
        from miocli.core.conversation import answer_turn
        from miocli.output.chatfiles import shown_text

        reply = self.mio.chat(self.history, mode=self.mode, system=self.system,
                              add_generation_prompt=add_generation_prompt, options=self.options,
                              on_text=self.shown.piece if self.shown.live else None, max_history=self.max_history,
                              **self.pixels)
        report_problems("answer", reply.problems)
        self.answers += 1
        written = self.files.write(self.answers, reply) if reply.images or reply.audio else {}
        files = [path for paths in written.values() for path in paths]
        # History keeps the raw answer so media the model produced stays in context: mio wrote those
        # token strings, so they stay tokens, while everything the user gave is plain text or codec output.
        self.history.append(answer_turn(reply, written))
        if self.max_history is not None:
            self._trim(self.max_history)
        if self.as_json:
            last = next((t for t in reversed(self.history) if t.role == "user"), None)
            emit_json({"task": "chat", "input": last.text if last is not None else "", **reply.to_record(),
                       "files": files})
        else:
            self.shown.done(shown_text(reply.text, written), files)

    def _trim(self, most: int) -> None:
        """At most `most` turns before the next question: memory stays bounded however long the session."""
        others = [t for t in self.history if t.role != "system"]
        dropped = {id(t) for t in others[: max(0, len(others) - most)]}
        self.history = [t for t in self.history if id(t) not in dropped]

    def interactive(self, history: list[Any]) -> int:
        from miocli.core.conversation import Part, Turn

        err("mio: interactive chat; an empty line or Ctrl-D ends it. /attach PATH, /save FILE, /reset.")
        self.history = list(history)
        worst = 0
        waiting: list[Any] = []
        if self.history and self.history[-1].role == "user" and not self.history[-1].text:
            waiting = self.history.pop().parts  # `-i -a FILE` without a question: for the first message
        if self.history and self.history[-1].role == "user":
            worst = self._guarded(self.answer)
        while True:
            line = _read_turn()
            if not line or not line.strip():
                return worst
            text = line.rstrip("\n")
            if text.startswith("/"):
                worst = max(worst, self._guarded(lambda line=text: self._command(line, waiting)))
                continue
            before = len(self.history)
            self.history.append(Turn("user", [Part("text", text=text), *waiting]))
            waiting.clear()
            code = self._guarded(self.answer)
            if code:
                del self.history[before:]  # the turn that failed is not part of the conversation
            worst = max(worst, code)

    @staticmethod
    def _guarded(step: Any) -> int:
        """A failed turn is reported and the session goes on; the session's exit code is its worst."""
        from miocli.errors import MioError, report

        try:
            step()
        except MioError as exc:
            report(exc)
            return exc.exit_code
        return 0

    def _command(self, text: str, waiting: list[Any]) -> None:
        from miocli.core.conversation import Part, attachment

        name, _, argument = text.partition(" ")
        argument = argument.strip()
        if name == "/attach" and argument:
            media = attachment(argument, f"/attach (message {len(self.history)})")
            waiting.append(Part(media.kind, media=media, path=argument))
            err(f"mio: {argument} ({media.kind}) goes with your next message")
        elif name == "/save" and argument:
            from miocli.output.files import atomic_write_text

            turns = ([{"role": "system", "content": self.system}] if self.system is not None else []) + \
                [t.to_json() for t in self.history]
            atomic_write_text(Path(argument), json.dumps(turns, indent=1, ensure_ascii=False) + "\n")
            err(f"mio: saved {len(turns)} turns to {argument} (use it with --messages)")
        elif name == "/reset" and not argument:
            self.history.clear()
            waiting.clear()
            err("mio: the conversation starts over")
        else:
            raise UsageError(f"unknown command {text!r}", hint="use /attach PATH, /save FILE or /reset")


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
