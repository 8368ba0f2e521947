"""Past one machine: a task mapped over a Ray Dataset, one full MIO pipeline per worker.

The unit of scale is a whole `Mio` (SEED/speech encoding, the LLM, unCLIP/speech decoding) in a
Ray actor that loads the model once and serves batch after batch; Ray Data feeds the actors and
hands the results back as they are made. Two ways in:

- `map_task(dataset, "caption", model=...)`: for users who build their own Ray pipelines. Rows
  in have a `path`, `bytes` (`ray.data.read_binary_files`), `text` or `item` column; rows out
  have `input`, `text`, `error` and `result`, the whole result as JSON (`to_result(row)` gives
  back the `Result` with its PIL images and exact audio samples).
- `RayMio`: what `mio … --ray` runs on. Like `RemoteMio` it offers `stream`, so the CLI's writer
  writes exactly what a local run writes (names, manifest, `--skip-existing`, exit codes).

Faults: Ray Data restarts a dead actor and retries its batch (`max_restarts`/`max_task_retries`
default to -1 for its actor pools), and a batch's output block is handed over once, so nothing is
lost or written twice; the driver also drops any index it has already seen. A bad input is that
row's error. A model or environment problem (exit 3) on a worker comes back as a `fatal` row and
ends the job here with that error.

Inputs are read by the workers: paths must be on a filesystem every node sees (they are made
absolute here). Ray is imported only when a job starts: `import ray` costs about 3 s.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from miocli.core.generation import GenerationOptions
from miocli.core.inputs import Item, Media
from miocli.core.results import Result, StoryPart
from miocli.errors import EnvironmentProblem, MioError, UsageError
from miocli.model.devices import RuntimeOptions
from miocli.serve import wire

INSTALL_HINT = "pip install 'miocli[ray]'"
# Result row columns; every row has all of them so that Arrow sees one schema in every block.
COLUMNS = ("index", "input", "text", "error", "result", "fatal")
LOCAL_STORE = 1 << 30
MAX_BLOCKS = 10_000


def require_ray() -> Any:
    """The ray module, or the one-line error that names the extra."""
    try:
        import ray
        import ray.data  # noqa: F401 (Ray Data is a separate part of the extra)
    except ImportError as exc:
        raise EnvironmentProblem(f"--ray needs Ray Data, which is not installed ({exc.name} is missing)",
                                 hint=INSTALL_HINT) from None
    return ray


# ---- rows: items that keep their paths ----------------------------------------------------------
def item_row(item: Item) -> dict[str, Any]:
    """An item as JSON for a Dataset row. A file stays a path (absolute), read by the worker; bytes,
    images and samples travel as `wire` encodes them."""
    data = wire.item_to_json(replace(item, media=[]))
    data["media"] = [_media_row(m) for m in item.media]
    return data


def _media_row(media: Media) -> dict[str, Any]:
    if media.path is not None and media.data is None and media.image is None and media.samples is None:
        return {"kind": media.kind, "name": media.name, "path": os.path.abspath(media.path)}
    return wire.media_to_json(media)


def item_from_row(data: dict[str, Any]) -> Item:
    media = data.get("media") or []
    item = wire.item_from_json({**data, "media": [m for m in media if "path" not in m]})
    # Put path media back in their places among the others.
    decoded = iter(item.media)
    item.media = [Media(m["kind"], m["name"], path=Path(m["path"])) if "path" in m else next(decoded) for m in media]
    return item


def to_result(row: dict[str, Any]) -> Result:
    """The `Result` of a result row (images as PIL images, audio as float32 samples)."""
    return wire.result_from_json(json.loads(row["result"]))


def _absolute(value: Any) -> Any:
    if isinstance(value, Media) and value.path is not None:
        return replace(value, path=Path(os.path.abspath(value.path)))
    if isinstance(value, (str, Path)) and os.path.exists(value):
        return os.path.abspath(value)
    return value


# ---- the worker: one Mio per actor --------------------------------------------------------------
@dataclass(frozen=True)
class JobSpec:
    """Everything a batch needs besides its inputs."""

    task: str
    options: GenerationOptions
    settings: dict[str, Any]
    examples: tuple[tuple[Any, str], ...] = ()
    template: str | None = None
    embeddings_only: bool = False
    question: str | None = None
    image: Any = None
    rate: int | None = None
    with_timbre: bool = False


class MioWorker:
    """A Ray Data callable class: the model loads on the first batch and stays for the next ones.

    A batch holds either chunks (`start`, `items`: what `RayMio` sends, one chunk = one local batch,
    so each prompt is batched with the same neighbours as in a local run) or single inputs (the
    `path`, `bytes`, `text` or `item` column of a user's Dataset).
    """

    def __init__(self, model: RuntimeOptions, job: JobSpec) -> None:
        from miocli.core.api import Mio

        self.job = job
        self.mio: Any = None
        self.problem: MioError | None = None
        if model.verbose:
            from miocli import quiet

            quiet.set_enabled(False)
        try:
            self.mio = Mio(**asdict(model))
            # An actor serves batch after batch, as `mio serve` does: it keeps every component that fits.
            self.mio.runtime.long_lived = True
        except MioError as exc:
            # Raised here it would kill the actor and Ray would start another to fail the same way.
            self.problem = exc

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {name: [] for name in COLUMNS}
        if "items" in batch:
            for start, text in zip(batch["start"], batch["items"]):
                self._chunk(int(start), [item_from_row(d) for d in json.loads(str(text))], out)
            return out
        if self.problem is not None:
            raise self.problem  # a user's pipeline: the job fails with the cause
        size = len(next(iter(batch.values()))) if batch else 0
        items = [self._row_item(batch, n) for n in range(size)]
        indices = [int(i) for i in batch["index"]] if "index" in batch else list(range(size))
        good = [n for n, item in enumerate(items) if isinstance(item, Item)]
        results = {good[r.index]: r for r in self._results([items[n] for n in good])}  # type: ignore[misc]
        for n, item in enumerate(items):
            if isinstance(item, MioError):
                _add(out, Result(task=self.job.task, input=_row_name(batch, n), error=item), indices[n])
            else:
                _add(out, results[n], indices[n])
        return out

    def _results(self, items: list[Item]) -> Iterator[Result]:
        """One local batch through the ordinary stream (indices 0…); a model problem raises."""
        job = self.job
        if self.problem is not None:
            raise self.problem
        if not items:
            return
        yield from self.mio.stream(job.task, items, examples=job.examples, template=job.template,
                                   embeddings_only=job.embeddings_only, options=job.options, **job.settings)

    def _chunk(self, start: int, items: list[Item], out: dict[str, list[Any]]) -> None:
        """A chunk's result rows; a model problem becomes `fatal` rows for the inputs it left without one."""
        done: set[int] = set()
        try:
            for result in self._results(items):
                done.add(result.index)
                _add(out, result, start + result.index)
        except MioError as exc:
            fatal = json.dumps(wire.error_to_json(exc))
            for offset, item in enumerate(items):
                if offset not in done:
                    out["index"].append(start + offset)
                    out["input"].append(item.name)
                    out["text"].append("")
                    out["error"].append(exc.message)
                    out["result"].append("")
                    out["fatal"].append(fatal)

    def _row_item(self, batch: dict[str, Any], n: int) -> Item | MioError:
        from miocli.core.api import _ItemContext

        job = self.job
        try:
            if "item" in batch and batch["item"][n] is not None:
                return item_from_row(json.loads(str(batch["item"][n])))
            if "bytes" in batch and batch["bytes"][n] is not None:
                value: Any = bytes(batch["bytes"][n])
            elif "path" in batch and batch["path"][n] is not None:
                value = str(batch["path"][n])
            elif "text" in batch and batch["text"][n] is not None:
                value = str(batch["text"][n])
            else:
                raise UsageError("a row needs an item, bytes, path or text column")
            item = self.mio._item(job.task, value, n, _ItemContext(job.question, job.image, job.rate,
                                                                   job.with_timbre))
            if "path" in batch and isinstance(value, bytes):
                item.name = str(batch["path"][n])  # read_binary_files(include_paths=True): named by the file
                for media in item.media:
                    media.name = item.name
            return item
        except MioError as exc:
            return exc


def _row_name(batch: dict[str, Any], n: int) -> str:
    for column in ("path", "text"):
        if column in batch and batch[column][n] is not None:
            return str(batch[column][n])
    return f"row {n + 1}"


def _add(out: dict[str, list[Any]], result: Result, index: int) -> None:
    result.index = index
    out["index"].append(index)
    out["input"].append(result.input)
    out["text"].append(result.text)
    out["error"].append(result.error.message if result.error is not None else "")
    out["result"].append(json.dumps(wire.result_to_json(result)))
    out["fatal"].append("")


# ---- the cluster ----------------------------------------------------------------------------------
@dataclass
class Cluster:
    """Where the actors run: `address` (or RAY_ADDRESS) joins a cluster, none starts a local one."""

    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None
    cpus_per_worker: float | None = None
    verbose: bool = False
    _started: bool = False

    def connect(self) -> Any:
        ray = require_ray()
        if ray.is_initialized():
            return ray
        address = self.address or os.environ.get("RAY_ADDRESS") or None
        quiet = {"logging_level": logging.WARNING, "log_to_driver": self.verbose}
        _ray_errors_to_stderr()  # before init, which binds the printer of the workers' logs
        if address:
            _check_reachable(address)
        try:
            if address:
                ray.init(address=address, **quiet)
            else:
                # A cluster of this machine only: on loopback, no dashboard, and an object store sized for
                # batches of inputs and results in flight (Ray's default reserves 30% of the memory; beyond
                # this it spills to disk).
                ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, object_store_memory=LOCAL_STORE,
                         **quiet)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
            raise EnvironmentProblem(f"cannot start or join {where}: {exc}",
                                     hint="check --ray-address / RAY_ADDRESS, or `ray status` on the head node") \
                from None
        self._started = True
        from ray.data import DataContext

        context = DataContext.get_current()
        # Results in input order: stdout and the manifest read as in a local run.
        context.execution_options.preserve_order = True
        context.enable_progress_bars = self.verbose and sys.stderr.isatty()
        # Ray Data's notices (progress bars off, resources) are not the user's business unless --verbose.
        logging.getLogger("ray.data").setLevel(logging.INFO if self.verbose else logging.ERROR)
        return ray

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    def actor_resources(self, ray: Any) -> tuple[int, float, float]:
        """(workers, CPUs and GPUs each): one worker per GPU by default, one worker on a CPU-only cluster."""
        total = ray.cluster_resources()
        gpus_total = float(total.get("GPU", 0))
        gpus = self.gpus_per_worker if self.gpus_per_worker is not None else (1.0 if gpus_total else 0.0)
        if gpus > gpus_total:
            raise EnvironmentProblem(f"--gpus-per-worker {gpus:g} but the Ray cluster has {gpus_total:g} GPU(s)",
                                     hint="use --gpus-per-worker 0 on CPU workers")
        workers = self.workers or (max(1, int(gpus_total // gpus)) if gpus else 1)
        cpus_total = float(total.get("CPU", 1))
        cpus = self.cpus_per_worker or (1.0 if gpus else max(1.0, float(int(cpus_total // workers))))
        return workers, cpus, gpus


def _check_reachable(address: str) -> None:
    """A HOST:PORT nobody answers on is one clear error now; Ray itself retries it for a minute or more."""
    import socket

    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return  # "auto", ray://…: Ray resolves those itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        raise EnvironmentProblem(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc})",
                                 hint="check --ray-address / RAY_ADDRESS (the head's GCS port, 6379 by default), "
                                      "or drop it to start a local cluster") from None


def _ray_errors_to_stderr() -> None:
    """Ray's driver prints the cluster's error notices ("a worker died …, the task will be retried") and
    the workers' stdout on its own stdout, where they would land among the results
    (`mio caption --ray … > captions.txt`); they go to stderr instead. Ray looks the printer up by its
    module global, so wrapping that is enough."""
    try:
        from ray._private import worker as ray_worker
    except ImportError:  # another Ray layout: its notices stay where Ray puts them
        return
    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "miocli", False):
        return

    def to_stderr(data: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        return original({**data, "is_err": True}, *args, **kwargs)

    to_stderr.miocli = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = to_stderr


def map_task(
    dataset: Any,
    task: str,
    *,
    model: str | None = None,
    variant: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    quantize: str = "auto",
    engine: str = "transformers",
    engine_url: str | None = None,
    workers: int = 1,
    gpus_per_worker: float = 0,
    cpus_per_worker: float = 1,
    batch_size: int = 8,
    question: str | None = None,
    image: Any = None,
    rate: int | None = None,
    with_timbre: bool = False,
    examples: Sequence[tuple[Any, str]] = (),
    template: str | None = None,
    options: GenerationOptions | None = None,
    **settings: Any,
) -> Any:
    """A Dataset of result rows: `task` mapped over `dataset` by `workers` actors, each with one `Mio`.

    Lazy, as Ray Datasets are: the work runs when the result is consumed (`iter_rows`,
    `write_parquet`, …). Settings are those of `Mio.stream` (seed, max_new_tokens, steps, …).
    """
    require_ray()
    if workers < 1:
        raise UsageError("workers must be at least 1")
    options = replace(options or GenerationOptions(), batch_size=batch_size)
    job = JobSpec(task.replace("-", "_"), _seeded(options), settings, tuple((_absolute(m), a) for m, a in examples),
                  template, question=question, image=_absolute(image), rate=rate, with_timbre=with_timbre)
    spec = RuntimeOptions(model, variant, device, dtype, quantize, engine=engine, engine_url=engine_url)
    return _map(dataset, spec, job, batch_size, workers, cpus_per_worker, gpus_per_worker)


def _map(dataset: Any, model: RuntimeOptions, job: JobSpec, batch_size: int, workers: int, cpus: float,
         gpus: float) -> Any:
    import ray.data

    # The CLI sets passive OpenMP waiting in `main` (busy-waiting threads were 3-6x slower whenever another
    # process held a core); actors never run `main`, so their environment says it before torch loads.
    environment = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    return dataset.map_batches(MioWorker, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=workers),
                               num_cpus=cpus, num_gpus=gpus or None, fn_constructor_args=(model, job),
                               batch_format="numpy", runtime_env={"env_vars": environment})


def _seeded(options: GenerationOptions) -> GenerationOptions:
    """A job without a seed gets one: pixels decoded in any worker then start from the same noise, as in one
    local run (sampling stays random; each prompt's stream still comes from its own row seed)."""
    return options if options.seed is not None else replace(options, seed=secrets.randbits(31))


# ---- what `mio … --ray` runs on -----------------------------------------------------------------
class RayMio:
    """The part of `Mio` the batch commands use, run on a Ray cluster."""

    def __init__(self, model: RuntimeOptions, cluster: Cluster) -> None:
        require_ray()  # before any input is read: the missing extra is the first thing said
        self.model = model
        self.cluster = cluster

    def stream(self, task: str, inputs: Iterable[Item], *, examples: Sequence[tuple[Any, str]] = (),
               template: str | None = None, embeddings_only: bool = False,
               on_part: Callable[[int, StoryPart], None] | None = None, options: GenerationOptions | None = None,
               on_step: Callable[[str, int, int], None] | None = None, **settings: Any) -> Iterator[Result]:
        """Results in input order as the workers finish them; `on_part` and `on_step` are not called (a
        story's images are written with its result, a worker's steps stay on the worker)."""
        items = list(inputs)
        if not items:
            return
        options = _seeded(options or GenerationOptions(batch_size=int(settings.pop("batch_size", 1) or 1)))
        size = options.batch_size
        rows = [{"start": start, "items": json.dumps([item_row(i) for i in items[start:start + size]])}
                for start in range(0, len(items), size)]
        job = JobSpec(task.replace("-", "_"), options, settings, tuple((_absolute(m), a) for m, a in examples),
                      template, embeddings_only)
        ray = self.cluster.connect()
        try:
            workers, cpus, gpus = self.cluster.actor_resources(ray)
            import ray.data

            # One block per chunk (any worker takes any chunk; a retry redoes one chunk; results come back
            # chunk by chunk) up to MAX_BLOCKS, beyond which Ray's bookkeeping per block costs more than a
            # retry that redoes a few chunks.
            dataset = ray.data.from_items(rows, override_num_blocks=min(len(rows), MAX_BLOCKS))
            results = _map(dataset, self.model, job, 1, min(workers, len(rows)), cpus, gpus)
            seen: set[int] = set()
            for row in results.iter_rows():
                index = int(row["index"])
                if index in seen:
                    continue
                seen.add(index)
                if row["fatal"]:
                    raise wire.error_from_json(json.loads(row["fatal"]))
                yield to_result(row)
        finally:
            self.cluster.close()

    def chat(self, *args: Any, **kwargs: Any) -> Result:
        raise UsageError("--ray runs batch commands; a chat runs here", hint="drop --ray")
