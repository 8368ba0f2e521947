"""The server's worker: one thread owns the model and runs every request's inputs in shared batches.

A request becomes a `Job`; the worker gathers the pending inputs of jobs with the same task and
settings into one generation batch (a short window, capped by --batch-size) and hands each result
back to its job's coroutine as soon as its batch is decoded (`events_of`). With per-prompt seeds a
result does not depend on the requests it was batched with. No web framework here: the routes
(`native`, `openai`) turn jobs' events into responses.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from miocli.core.inputs import Example, Item
from miocli.core.results import StoryPart
from miocli.engines.base import Cancelled
from miocli.errors import EnvironmentProblem, MioError, UsageError

# The server's log: a copy of stderr taken at start. While a decoder runs, miocli.quiet points fd 2
# at /dev/null for the whole process; lines written by other threads then must not vanish with it.
_LOG: Any = None


def log(message: str) -> None:
    global _LOG
    if _LOG is None:
        try:
            _LOG = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)
        except (OSError, ValueError, AttributeError):
            _LOG = sys.stderr
    print(f"mio serve: {message}", file=_LOG, flush=True)


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8765
    api_key: str | None = None
    batch_size: int = 8
    batch_window_s: float = 0.005
    max_body_bytes: int = 64 * 2**20
    request_timeout_s: float = 600.0
    idle_unload_s: float | None = None


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '2h' → seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    value = text.strip().lower()
    scale = units.get(value[-1:])
    number = value[:-1] if scale else value
    try:
        seconds = float(number) * (scale or 1)
    except ValueError:
        raise UsageError(f"cannot read {text!r} as a duration", hint="use e.g. 90s, 10m or 2h") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise UsageError(f"the duration {text!r} must be above 0")
    return seconds


@dataclass
class Job:
    """One request's inputs on their way through the worker."""

    task: str
    items: list[Item]
    settings: dict[str, Any]
    examples: list[Example]
    template: str | None
    embeddings_only: bool
    # Whether the request shows its answers as they are generated ("tokens" events).
    streams_tokens: bool = False
    # Filled by the worker from its thread, read by the request's coroutine on its event loop.
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    next_item: int = 0
    cancelled: bool = False
    # Why it was cancelled: its client hung up (the log says 499, as nginx does), or its time ran out.
    client_left: bool = False
    timed_out: bool = False

    def end_cancelled(self) -> None:
        """From the worker thread: the job will get no more results; its coroutine stops waiting."""
        self.emit("error", MioError("the request was cancelled", hint="its client left or its time ran out"))

    def emit(self, kind: str, value: Any) -> None:
        """From the worker thread: hand an event to the request's coroutine."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def key(self) -> str:
        """Jobs with the same key can share a generation batch."""
        examples = [(e.media.name, len(e.media.data or b""), e.answer) for e in self.examples]
        # A client's batch size only says how it chunks its inputs; the server's --batch-size decides.
        # A seed goes with each input (`own_seed`) where it only seeds the LLM's sampling.
        per_item = {"batch_size", "seed"} if self.task in ITEM_SEEDED else {"batch_size"}
        settings = {k: v for k, v in self.settings.items() if k not in per_item}
        return json.dumps([self.task, settings, examples, self.template, self.embeddings_only], sort_keys=True,
                          default=str)


# Tasks whose seed only seeds the LLM's sampling, so that requests with different seeds can share a
# batch (each input's stream comes from its own seed: the answer is that of the request run alone).
# The image tasks also seed their pictures' noise, which is one per batch.
ITEM_SEEDED = frozenset({"chat", "generate", "ask", "caption", "asr", "tts", "speak", "speech2speech",
                         "video_caption"})


def own_seed(job: Job, index: int) -> Item:
    item = job.items[index]
    seed = job.settings.get("seed")
    return replace(item, seed=seed) if job.task in ITEM_SEEDED and seed is not None else item


class Worker:
    """Runs jobs on the model in one thread, batching items of jobs that share a key."""

    def __init__(self, mio: Any, settings: ServeSettings) -> None:
        self.mio = mio
        # A warm server keeps every component that fits (a one-shot command releases sooner).
        mio.runtime.long_lived = True
        self.settings = settings
        self.pending: list[Job] = []
        self.lock = threading.Condition()
        self.busy_since: float | None = None
        self.last_work = time.monotonic()
        self.requests = 0
        self.batches = 0
        self.items_done = 0
        # Answer tokens generated (beams' excepted: theirs are final only at the end), for /health.
        self.tokens_generated = 0
        # The jobs of the batch on the model now, and whether the server is stopping (see `shutdown`).
        self.running: list[Job] = []
        self.closing = False
        self.thread = threading.Thread(target=self._loop, name="mio-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job (from the request's coroutine: its loop receives the events)."""
        job.loop = asyncio.get_running_loop()
        with self.lock:
            self.pending.append(job)
            self.requests += 1
            self.lock.notify()

    def _take_batch(self) -> tuple[list[tuple[Job, int]], Job] | None:
        """Up to batch_size items of the oldest job's key, from that job and any others with the same key."""
        with self.lock:
            for job in self.pending:
                if job.cancelled and job.next_item < len(job.items):
                    job.end_cancelled()  # left while queued: nobody may wait for it till the timeout
            self.pending = [j for j in self.pending if not j.cancelled and j.next_item < len(j.items)]
            if not self.pending or self.closing:
                return None
            first = self.pending[0]
            limit = self._batch_limit(first)
            chosen: list[tuple[Job, int]] = []
            for job in [j for j in self.pending if j.key() == first.key()]:
                while job.next_item < len(job.items) and len(chosen) < limit:
                    chosen.append((job, job.next_item))
                    job.next_item += 1
            return chosen, first

    def _batch_limit(self, job: Job) -> int:
        # Interleave decodes its images while streaming: one story at a time. Otherwise the server's
        # --batch-size decides (a client's batch size only chunks its requests).
        return 1 if job.task == "interleave" else self.settings.batch_size

    def shutdown(self, timeout_s: float) -> bool:
        """Cancel every queued and running job and wait up to `timeout_s` for the thread to leave the
        model; True when it did. Torch must not be inside a kernel when the interpreter exits (that
        aborts the process instead of exiting 0)."""
        stopping = MioError("the server is shutting down", hint="send the request again once it is back")
        with self.lock:
            self.closing = True
            for job in [*self.pending, *self.running]:
                if not job.cancelled:
                    job.cancelled = True
                    job.emit("error", stopping)
            self.pending = []
            self.lock.notify()
        self.thread.join(timeout_s)
        return not self.thread.is_alive()

    def _loop(self) -> None:
        while not self.closing:
            with self.lock:
                while not self.pending and not self.closing:
                    if not self.lock.wait(timeout=self._idle_wait()):
                        self._maybe_unload()
            if self.closing:
                return
            # A short window lets concurrent requests for the same task join this batch.
            time.sleep(self.settings.batch_window_s)
            taken = self._take_batch()
            if taken is None:
                continue
            chosen, first = taken
            self.busy_since = time.monotonic()
            with self.lock:
                self.running = list({id(job): job for job, _ in chosen}.values())
            try:
                self._run(chosen, first)
            finally:
                with self.lock:
                    self.running = []
                self.busy_since = None
                self.last_work = time.monotonic()

    def _run(self, chosen: list[tuple[Job, int]], first: Job) -> None:
        items = [own_seed(job, index) for job, index in chosen]
        settings = {**first.settings, "batch_size": len(items)}
        if first.task in ITEM_SEEDED:
            settings.pop("seed", None)
        self.batches += 1
        self.items_done += len(items)

        def on_part(position: int, part: StoryPart) -> None:
            job, index = chosen[position]
            job.emit("part", (index, part))

        def on_tokens(position: int, ids: list[int]) -> None:
            job, index = chosen[position]
            self.tokens_generated += len(ids)
            if job.streams_tokens and not job.cancelled:
                job.emit("tokens", (index, ids))

        def cancelled(position: int) -> bool:
            # A client that left or ran out of time, or a server shutting down: stop at the next step.
            return chosen[position][0].cancelled or self.closing

        try:
            stream = self.mio.stream(first.task, items, examples=[(e.media, e.answer) for e in first.examples],
                                     template=first.template, embeddings_only=first.embeddings_only,
                                     on_part=on_part, on_tokens=on_tokens,
                                     cancelled=cancelled, **settings)
            for result in stream:
                job, index = chosen[result.index]
                result.index = index
                job.emit("result", result)
        except Cancelled:
            # Every job of the batch is gone; a coroutine still waiting for one of them stops now.
            for job in {id(job): job for job, _ in chosen}.values():
                job.end_cancelled()
        except MioError as exc:
            # A usage, model or environment problem ends every job of this batch with that error.
            for job in {id(job): job for job, _ in chosen}.values():
                job.cancelled = True
                job.emit("error", exc)
        except Exception as exc:  # a bug must not kill the worker (and with it every later request)
            log(f"unexpected {exc.__class__.__name__} in a batch of {first.task}: {exc}")
            problem = MioError(f"the server failed on this batch ({exc.__class__.__name__}: {exc})")
            for job in {id(job): job for job, _ in chosen}.values():
                job.cancelled = True
                job.emit("error", problem)

    def _idle_wait(self) -> float | None:
        if self.settings.idle_unload_s is None:
            return None
        return max(0.05, self.settings.idle_unload_s - (time.monotonic() - self.last_work))

    def _maybe_unload(self) -> None:
        idle = self.settings.idle_unload_s
        if idle is not None and time.monotonic() - self.last_work >= idle and self.mio.runtime.loaded():
            unloaded = self.mio.runtime.unload()
            log(f"idle for {idle:g} s: unloaded {', '.join(unloaded)}")


async def events_of(job: Job, timeout_s: float) -> AsyncIterator[tuple[str, Any]]:
    """The job's events as the worker produces them, ending after its last result (or an error)."""
    deadline = time.monotonic() + timeout_s
    done = 0
    try:
        while done < len(job.items):
            try:
                kind, value = await asyncio.wait_for(job.events.get(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                job.cancelled = job.timed_out = True
                yield "error", EnvironmentProblem(f"the request took longer than {timeout_s:g} s",
                                                  hint="send fewer inputs per request or raise --request-timeout")
                return
            if kind == "result":
                done += 1
            yield kind, value
            if kind == "error":
                return
    finally:
        # A client that went away frees the rest of its work for others.
        job.cancelled = job.cancelled or done < len(job.items)
