"""A request's job: what to run (`Plan`), checked by the core before it is queued, then its results awaited."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from dataclasses import dataclass, field, fields
from typing import Any

from miocli.core.inputs import Item
from miocli.core.results import Result
from miocli.errors import UsageError
from miocli.serve.openai.protocol import OpenAIError, from_mio
from miocli.serve.worker import Job, events_of


@dataclass
class Plan:
    """A job to queue and what the response needs to know about it."""

    task: str  # the core's task name (Mio.stream)
    table: str  # the task table's entry, whose preset and output the settings are checked against
    items: list[Item]
    settings: dict[str, Any]
    # Set for prompts without media, whose token count is known without encoding anything.
    prompt: str | None = None
    # The request's name for max_new_tokens, for the core's "too small for an image" message.
    limit_name: str = "max_new_tokens"
    max_new_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def check_plan(mio: Any, plan: Plan) -> None:
    """The core's own checks on the settings, before anything is queued: a bad value costs no batch."""
    from miocli.core.api import GenerationOptions
    from miocli.core.tasks import TASKS

    try:
        mio.check_settings(plan.task, plan.settings)
        names = {f.name for f in fields(GenerationOptions)} - {"seed", "batch_size", "constrain"}
        options = GenerationOptions(**{k: v for k, v in plan.settings.items() if k in names})
        plan.max_new_tokens = mio.engine.settings_for(TASKS[plan.table], options.overrides()).max_new_tokens
    except UsageError as exc:
        raise from_mio(exc, queued=False, limit_name=plan.limit_name) from None


def submit_plan(mio: Any, worker: Any, plan: Plan, streams_tokens: bool = False) -> Job:
    """Check the plan and queue its job."""
    check_plan(mio, plan)
    job = Job(plan.task, plan.items, plan.settings, [], None, False, streams_tokens=streams_tokens)
    worker.submit(job)
    return job


async def watch_client(request: Any, job: Job) -> None:
    """Cancel the job as soon as its client hangs up: its generation stops at the next step and
    its batch place goes to others (a plain request would notice nothing until it answers).

    The body has been read, so the next message the server hands over is the disconnect: waiting
    for it costs nothing (polling `is_disconnected` sees nothing through an HTTP middleware).
    """
    while not job.cancelled:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            job.client_left = True
            job.cancelled = True
            return
        await asyncio.sleep(0.05)  # a late empty body message: not a reason to spin


def job_error(value: Any, plan: Plan, job: Job) -> OpenAIError:
    """The job's error event as the request's answer."""
    if job.client_left:
        # Nobody reads it; the status is for the log (nginx's "client closed request"), not a 5xx.
        return OpenAIError("the client closed the request", status=499, kind="client_closed")
    if job.timed_out:
        return OpenAIError(value.message, status=504, kind="timeout", code="timeout")
    return from_mio(value, queued=True, limit_name=plan.limit_name)


async def run_plan(mio: Any, worker: Any, plan: Plan, request: Any) -> list[Result]:
    """Queue the plan's job and wait for all its results; a failed input fails the request."""
    job = submit_plan(mio, worker, plan)
    results: list[Result | None] = [None] * len(plan.items)
    watcher = asyncio.create_task(watch_client(request, job))
    try:
        async with aclosing(events_of(job, worker.settings.request_timeout_s)) as events:
            async for kind, value in events:
                if kind == "result":
                    results[value.index] = value
                elif kind == "error":
                    raise job_error(value, plan, job)
    except asyncio.CancelledError:
        job.cancelled = True  # the client went away: its place in the queue goes to others
        raise
    finally:
        watcher.cancel()
    done = [r for r in results if r is not None]
    for result in done:
        if result.error is not None:
            raise from_mio(result.error, queued=True, limit_name=plan.limit_name)
    if len(done) != len(plan.items):
        raise OpenAIError("the server lost part of this request's results", status=500, kind="server_error")
    return done


async def count_prompt_tokens(mio: Any, plan: Plan) -> int:
    """The prompt's token count when it has no media (counting those would mean encoding them again)."""
    if plan.prompt is None:
        return 0
    from miocli.core.prompts import Prompt

    return len(await asyncio.to_thread(mio.prompt_ids, Prompt(plan.prompt)))
