"""`--engine-url URL`: MIO's LLM on a running `vllm serve` of the same checkpoint.

Token ids go both ways (`/v1/completions` with a token-id prompt and `return_token_ids`), so mio's
tokenizer and the server's never need to agree on text. The decodable-output rule travels in each
request's `vllm_xargs` and needs the server started with
`--logits-processors miocli.engines.vllm_processor:MioRuleProcessor`; mio checks that once (a probe
with an invalid rule must be refused) rather than trust outputs the rule never saw.

Standard library only: a client machine needs neither torch's CUDA build nor vLLM.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from miocli.engines.base import Job, finish, vllm_request_settings
from miocli.engines.rules import XARG
from miocli.errors import EnvironmentProblem, ModelError

SERVE_HINT = ("start one with `python -m vllm.entrypoints.openai.api_server --model MODEL_DIR --dtype auto "
              "--logits-processors miocli.engines.vllm_processor:MioRuleProcessor --generation-config vllm` "
              "(docs/engines.md), or check --engine-url / MIO_ENGINE_URL")
# A request's whole answer comes back at once: long speech on a busy server takes minutes.
TIMEOUT_S = 1800.0


class VllmServer:
    name = "vllm-server"

    def __init__(self, url: str, *, vocab_size: int | None = None) -> None:
        self.url = url.rstrip("/")
        for suffix in ("/v1/completions", "/v1"):
            if self.url.endswith(suffix):
                self.url = self.url[: -len(suffix)]
        self.vocab_size = vocab_size
        self._model: str | None = None
        self._has_rule: bool | None = None

    # ---- HTTP ----------------------------------------------------------------------------------
    def _call(self, path: str, body: dict[str, Any] | None = None, timeout: float = TIMEOUT_S) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method="POST" if data else "GET",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (the user's URL)
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read() or b"null")
            except ValueError:
                detail = None
            return exc.code, detail
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise EnvironmentProblem(f"cannot reach the vLLM server at {self.url}: {reason}",
                                     hint=SERVE_HINT) from None
        except ValueError:
            raise EnvironmentProblem(f"{self.url}{path} did not answer JSON: is it a `vllm serve`?",
                                     hint=SERVE_HINT) from None

    def model(self) -> str:
        """The served model's name (checked once: the first request finds an unreachable server)."""
        if self._model is None:
            status, body = self._call("/v1/models", timeout=30)
            models = body.get("data") if isinstance(body, dict) else None
            if status != 200 or not models:
                raise EnvironmentProblem(f"{self.url}/v1/models answered {status}: not a `vllm serve`?",
                                         hint=SERVE_HINT)
            self._model = str(models[0]["id"])
        return self._model

    def check_rule(self) -> None:
        """EnvironmentProblem unless the server runs MioRuleProcessor: it must refuse an invalid rule."""
        if self._has_rule:
            return
        status, _ = self._call("/v1/completions", {"model": self.model(), "prompt": [1], "max_tokens": 1,
                                                   "vllm_xargs": {XARG: "not a rule"}}, timeout=120)
        if status == 200:
            raise EnvironmentProblem(
                f"the vLLM server at {self.url} does not run mio's decodable-output rule",
                hint="restart it with --logits-processors miocli.engines.vllm_processor:MioRuleProcessor "
                     "(miocli installed in its Python), or pass --no-constrain")
        self._has_rule = True

    # ---- generation ----------------------------------------------------------------------------
    def _request(self, job: Job, n: int, seed: int | None) -> list[int]:
        if job.is_cancelled(n):
            return []
        prompt = list(job.prompts[n])
        settings = job.settings
        body: dict[str, Any] = {
            "model": self.model(), "prompt": prompt, "max_tokens": settings.max_new_tokens,
            "return_token_ids": True, "stop_token_ids": [job.stop_id], "ignore_eos": True,
            "skip_special_tokens": False,
        }
        if settings.num_beams > 1:
            body.update(use_beam_search=True, n=settings.num_beams, temperature=0.0,
                        length_penalty=settings.length_penalty)
        else:
            body.update(vllm_request_settings(settings))
            if seed is not None:
                body["seed"] = seed
            if job.rule_for is not None:
                body["vllm_xargs"] = {XARG: job.rule_for(settings.max_new_tokens).to_json()}
        if (job.on_tokens is not None or job.cancelled is not None) and settings.num_beams == 1:
            body["stream"] = True

            def arrived(ids: list[int]) -> None:
                if job.on_tokens is not None:
                    job.on_tokens(n, ids)

            return finish(self._stream(body, arrived, lambda: job.is_cancelled(n)), job.stop_id, job.pad_id)
        status, answer = self._call("/v1/completions", body)
        if status != 200:
            message = answer.get("error", answer) if isinstance(answer, dict) else answer
            if isinstance(message, dict):
                message = message.get("message", message)
            raise ModelError(f"the vLLM server at {self.url} refused the request ({status}): {message}",
                             hint="check that it serves the same MIO checkpoint as --model")
        ids = answer["choices"][0].get("token_ids")
        if ids is None:
            raise EnvironmentProblem(f"the vLLM server at {self.url} returned no token ids",
                                     hint="use a vLLM release whose /v1/completions takes return_token_ids")
        return finish(ids, job.stop_id, job.pad_id)

    def _stream(self, body: dict[str, Any], on_tokens: Any, cancelled: Any = None) -> list[int]:
        """A streamed completion (server-sent events): each chunk's ids to `on_tokens` as they arrive.
        Once `cancelled()` says so the connection is closed, which makes vLLM abort the request."""
        request = urllib.request.Request(self.url + "/v1/completions", data=json.dumps(body).encode(),
                                         method="POST", headers={"Content-Type": "application/json"})
        ids: list[int] = []
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:  # noqa: S310 (the user's URL)
                for raw in response:
                    if cancelled is not None and cancelled():
                        break
                    line = raw.decode("utf-8", "replace").strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    if "error" in chunk:
                        raise ModelError(f"the vLLM server at {self.url} failed the request: {chunk['error']}")
                    new = [int(i) for c in chunk.get("choices", []) for i in (c.get("token_ids") or [])]
                    if new:
                        ids += new
                        if on_tokens is not None:
                            on_tokens(new)
        except urllib.error.HTTPError as exc:
            raise ModelError(f"the vLLM server at {self.url} refused the request ({exc.code}): "
                             f"{exc.read()[:500].decode('utf-8', 'replace')}",
                             hint="check that it serves the same MIO checkpoint as --model") from None
        except (urllib.error.URLError, OSError) as exc:
            raise EnvironmentProblem(f"cannot reach the vLLM server at {self.url}: {getattr(exc, 'reason', exc)}",
                                     hint=SERVE_HINT) from None
        return ids

    def generate(self, job: Job) -> list[list[int]]:
        if job.rule_for is not None and job.settings.num_beams == 1:
            self.check_rule()
        sampled = job.settings.do_sample and job.seeds is not None
        seeds = [job.seeds[n] if sampled else None for n in range(len(job.prompts))]  # type: ignore[index]
        results: list[list[int]] = []
        # One request per prompt, `batch_size` in flight: the server batches them continuously,
        # and each sampled prompt keeps its own seed (its answer does not depend on its neighbours).
        with ThreadPoolExecutor(max_workers=max(1, job.batch_size)) as pool:
            for start in range(0, len(job.prompts), job.batch_size):
                chunk = range(start, min(start + job.batch_size, len(job.prompts)))
                results += pool.map(lambda n: self._request(job, n, seeds[n]), chunk)
                if job.on_batch_done is not None:
                    job.on_batch_done(len(chunk))
        # With beams `on_tokens` is not called, as with transformers (a beam is only final at its end).
        job.check_cancelled(range(len(job.prompts)))
        return results
