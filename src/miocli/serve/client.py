"""`--server URL`: the commands' runs sent to `mio serve`, results read back as they come.

`RemoteMio` offers the part of `Mio` the commands use (`stream`, `chat`), so the CLI's writer
writes exactly what an in-process run writes. Files are read here and sent as bytes; a file
that cannot be read is reported here, by the same loader an in-process run uses. Inputs go in
requests of one batch each, so a killed client loses at most the batch in flight and the server
carries on with other clients' work.

Standard library HTTP only, and no torch: a client command starts in a fraction of a second.
"""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

from miocli.core.inputs import Item, Media
from miocli.core.results import Result, StoryPart
from miocli.errors import EnvironmentProblem, InputError, MioError, UsageError
from miocli.serve import wire

DEFAULT_CHUNK = 8


class RemoteMio:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 3600.0) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"--server {url!r} is not an http(s) URL", hint="e.g. --server http://127.0.0.1:8765")
        self.url = url
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.base = parts.path.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("MIO_API_KEY")
        self.timeout = timeout

    # ---- HTTP ---------------------------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> http.client.HTTPResponse:
        headers = {"Accept": "application/x-ndjson, application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        connection = self._connection()
        try:
            connection.request(method, self.base + path, body=data, headers=headers)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            raise EnvironmentProblem(f"cannot reach mio serve at {self.url}: {exc}",
                                     hint="start it with `mio serve`, or drop --server / MIO_SERVER") from None
        if response.status >= 400:
            raise _http_error(response, self.url)
        return response

    def health(self) -> dict[str, Any]:
        return json.loads(self._request("GET", "/health").read())

    # ---- what the commands call ---------------------------------------------------------------
    def stream(self, task: str, inputs: Iterable[Item], *, examples: list[tuple[Any, str]] | tuple = (),
               template: str | None = None, embeddings_only: bool = False,
               on_part: Callable[[int, StoryPart], None] | None = None, options: Any = None,
               on_step: Callable[[str, int, int], None] | None = None, **settings: Any) -> Iterator[Result]:
        """Results in input order, a request of one batch at a time; `on_step` is not called (the
        steps inside an input happen on the server)."""
        if options is not None:
            settings = {**_options_dict(options), **settings}
        settings = {k: v for k, v in settings.items() if v is not None}
        chunk = max(1, int(settings.get("batch_size") or DEFAULT_CHUNK))
        body_extra = {"examples": wire.examples_to_json(list(examples)), "template": template,
                      "embeddings_only": embeddings_only, "settings": settings}
        start = 0
        pending: list[Item] = []
        for item in inputs:
            pending.append(item)
            if len(pending) == chunk:
                yield from self._run_chunk(task, pending, start, body_extra, on_part)
                start += len(pending)
                pending = []
        if pending:
            yield from self._run_chunk(task, pending, start, body_extra, on_part)

    def _run_chunk(self, task: str, items: list[Item], start: int, body_extra: dict[str, Any],
                   on_part: Callable[[int, StoryPart], None] | None) -> Iterator[Result]:
        local: dict[int, Result] = {}
        sent: list[tuple[int, dict[str, Any]]] = []
        for offset, item in enumerate(items):
            try:
                sent.append((offset, _item_json(item)))
            except InputError as exc:
                local[offset] = Result(task=task, input=item.name, index=start + offset, error=exc)
        remote: Iterator[Result] = iter(())
        if sent:
            response = self._request("POST", f"/v1/run/{task}", {"inputs": [j for _, j in sent], **body_extra})
            remote = self._results(response, [offset for offset, _ in sent], start, on_part)
        for offset in range(len(items)):
            if offset in local:
                yield local[offset]
            else:
                yield next(remote)
        for _ in remote:  # drain: the response ends after the last result
            pass

    def _results(self, response: http.client.HTTPResponse, offsets: list[int], start: int,
                 on_part: Callable[[int, StoryPart], None] | None,
                 on_text: Callable[[int, str], None] | None = None) -> Iterator[Result]:
        while True:
            line = response.readline()
            if not line:
                return
            event = json.loads(line)
            if event["type"] == "result":
                result = wire.result_from_json(event["result"])
                result.index = start + offsets[result.index]
                yield result
            elif event["type"] == "tokens" and on_text is not None and event.get("text"):
                on_text(start + offsets[int(event["index"])], str(event["text"]))
            elif event["type"] == "part" and on_part is not None:
                on_part(start + offsets[int(event["index"])], wire.part_from_json(event["part"]))
            elif event["type"] == "error":
                raise wire.error_from_json(event["error"])

    def chat(self, messages: Any, *, mode: str = "std", system: str | None = None,
             add_generation_prompt: bool = True, options: Any = None,
             on_text: Callable[[str], None] | None = None, max_history: int | None = None,
             **settings: Any) -> Result:
        """As `Mio.chat`, `on_text` included (the server sends the text as it is generated). Media parts are
        read here and sent as their bytes; `max_history` keeps that many turns before the last (a server
        refuses a conversation past its context, it drops nothing)."""
        from miocli.core.conversation import parse_messages, to_wire

        turns = parse_messages(messages)
        if max_history is not None:
            others = [t for t in turns[:-1] if t.role != "system"]
            dropped = {id(t) for t in others[: max(0, len(others) - max_history)]}
            turns = [t for t in turns if id(t) not in dropped]
        # The interactive session's own answers go back marked as mio's output (their media tokens
        # stay tokens); every other content is user text, there as here.
        wired = to_wire(turns)
        users = [t for t in turns if t.role == "user"]
        item = {"name": users[-1].text if users else "", "messages": wired, "mode": mode, "system": system,
                "add_generation_prompt": add_generation_prompt}
        if options is not None:
            settings = {**_options_dict(options), **settings}
        body = {"inputs": [item], "settings": {k: v for k, v in settings.items() if v is not None},
                "stream_tokens": on_text is not None}
        response = self._request("POST", "/v1/run/chat", body)
        if on_text is None:
            [result] = list(self._results(response, [0], 0, None))
            return result.raise_for_error()
        shown: list[str] = []

        def arrived(_index: int, piece: str) -> None:
            shown.append(piece)
            on_text(piece)

        [result] = list(self._results(response, [0], 0, None, arrived))
        # What the pieces did not show yet (they are a prefix of the final text; see core.deltas).
        sent = "".join(shown)
        if result.error is None and result.text.startswith(sent) and result.text != sent:
            on_text(result.text[len(sent):])
        return result.raise_for_error()


def _item_json(item: Item) -> dict[str, Any]:
    """The item with its files read; InputError (the in-process loader's own) for a file that cannot be."""
    for media in item.media:
        if media.path is not None and media.data is None:
            media_path = media.path
            try:
                data = media_path.read_bytes()
            except OSError:
                data = b""
            if not data:
                _local_error(media)
            media.data = data
    return wire.item_to_json(item)


def _local_error(media: Media) -> None:
    """Raise the error an in-process run gives for this unreadable or empty file."""
    media.load()
    raise InputError(f"cannot read {media.name}", source=media.name)


def _http_error(response: http.client.HTTPResponse, url: str) -> MioError:
    raw = response.read()
    try:
        error = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and "message" in error:
        return wire.error_from_json(error)
    return EnvironmentProblem(f"mio serve at {url} answered HTTP {response.status} {response.reason}")


def _options_dict(options: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(options)
