"""The Ray Serve application: an OpenAI-compatible HTTP API over a run's newest accepted version.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with
server-sent-event streaming), GET /health. Every answer names its version in `model`
("RUN:vNNNN") and in the `x-tributary-version` header. Each replica follows the run on its
own (trainer/serve/follow.py) unless a version is pinned.
"""


import asyncio
import hmac
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from trainer.serve.generate import Finished, Piece, answer
from trainer.serve.openai_api import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Job,
    Limits,
    Reply,
    body_too_large,
    job,
    openapi_schemas,
    parse,
    sse,
)
from trainer.serve.options import API_KEY_ENV, ServeOptions, key_digest

VERSION_HEADER = "x-tributary-version"


class ThreadEvents:
    """A blocking generator run on its own thread, read from the event loop."""

    END = object()

    def __init__(self, events: Iterator) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.events = events
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            for event in self.events:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except BaseException as exc:  # noqa: BLE001 - handed to the request, which raises it
            self.loop.call_soon_threadsafe(self.queue.put_nowait, exc)
        self.loop.call_soon_threadsafe(self.queue.put_nowait, self.END)

    async def next(self):
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        if item is self.END:
            raise RuntimeError("the generation ended without a result")
        return item


api = FastAPI(title="Tributary", docs_url=None, redoc_url=None)


def _body_schema(name: str) -> dict:
    """The route's request body in /openapi.json (the handlers read the raw body, so that
    every refusal is an OpenAI-shaped 4xx, and FastAPI cannot see it by itself)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{name}"}}}}}


def _openapi() -> dict:
    if api.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=api.title, version=api.version, routes=api.routes)
        schema.setdefault("components", {}).setdefault("schemas", {}).update(openapi_schemas())
        api.openapi_schema = schema
    return api.openapi_schema


api.openapi = _openapi


async def read_body(request: Request) -> bytes:
    """The request body, refused past MAX_BODY_BYTES before more of it is read."""
    from trainer.serve.openai_api import MAX_BODY_BYTES

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise body_too_large()
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise body_too_large()
        parts.append(part)
    return b"".join(parts)


@serve.deployment(name="tributary-model", max_ongoing_requests=32, health_check_period_s=5)
@serve.ingress(api)
class ModelServer:
    def __init__(self, options: ServeOptions) -> None:
        import torch

        from trainer.config import load_config
        from trainer.serve.backend import TransformersBackend
        from trainer.serve.follow import Follower
        from trainer.serve.metrics import ServeMetrics
        from trainer.serve.versions import VersionError, VersionSource

        if not options.num_gpus:
            torch.set_num_threads(max(1, int(options.num_cpus)))
        self.options = options
        self.source = VersionSource(options.run_dir)
        config = load_config(f"{self.source.shown}/config.yaml", text=self.source.config_text(),
                             check_files=False)
        first = options.version or self.source.latest()
        if first is None:
            raise VersionError(f"{self.source.shown}: no accepted version yet")
        device = "cuda" if options.num_gpus and torch.cuda.is_available() else "cpu"
        self.backend = TransformersBackend(config=config, first=self.source.folder(first),
                                           version=first, device=device)
        self.limits = Limits(context_tokens=self.backend.context_tokens,
                             max_tokens=options.max_tokens)
        replica = serve.get_replica_context().replica_id.unique_id
        self.metrics = ServeMetrics(run=self.source.run_name, replica=replica)
        self.metrics.swapped(version=first, seconds=None)
        self.swaps: list[dict] = []
        self.follower = None
        if options.version is None:
            self.follower = Follower(self.source, self.backend, poll_s=options.poll_s,
                                     on_swap=self._swapped).start()

    def __del__(self) -> None:
        if getattr(self, "follower", None) is not None:
            self.follower.stop()

    def _swapped(self, swap) -> None:
        self.swaps.append({"version": swap.version, "seconds": round(swap.seconds, 4),
                           "bytes_loaded": swap.bytes_loaded})
        self.metrics.swapped(version=swap.version, seconds=swap.seconds)

    @property
    def name(self) -> str:
        return self.source.run_name

    @api.get("/health")
    def health(self) -> dict:
        """Open without the API key (for load balancers): the version and the swaps so far."""
        unable = self.follower.unable_s if self.follower is not None else 0.0
        return {"status": "ok", "version": self.backend.version, "replica": self.metrics.replica,
                "pinned": self.options.version is not None, "swaps": self.swaps[-20:],
                "unable_to_look_s": round(unable, 1)}

    @api.get("/v1/models")
    def models(self, request: Request):
        try:
            self._authorize(request)
        except ApiError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        version = self.backend.version
        data = [{"id": model, "object": "model", "created": 0, "owned_by": "tributary",
                 "version": version} for model in (self.name, f"{self.name}:{version}")]
        return JSONResponse({"object": "list", "data": data}, headers={VERSION_HEADER: version})

    @api.post("/v1/completions", openapi_extra=_body_schema("CompletionRequest"))
    async def completions(self, request: Request):
        return await self._answer(request, CompletionRequest, route="completions")

    @api.post("/v1/chat/completions", openapi_extra=_body_schema("ChatRequest"))
    async def chat(self, request: Request):
        return await self._answer(request, ChatRequest, route="chat")

    async def _answer(self, request: Request, kind, *, route: str):
        started = time.perf_counter()
        try:
            self._authorize(request)
            checked = self._check_model(parse(await read_body(request), kind))
            # Tokenizing a long prompt takes a while: off the event loop, so that other
            # requests' streams keep flowing meanwhile.
            work = await asyncio.to_thread(job, checked, tokenizer=self.backend.tokenizer,
                                           limits=self.limits)
        except ApiError as exc:
            self.metrics.request(route=route, code=exc.status,
                                 seconds=time.perf_counter() - started)
            return JSONResponse(exc.body(), status_code=exc.status)
        cancelled = threading.Event()
        events = ThreadEvents(answer(self.backend, work.prompt, work.sampling, stop=work.stop,
                                     cancelled=cancelled))
        if work.stream:
            return await self._stream(events, work, route=route, started=started,
                                      cancelled=cancelled)
        try:  # a client that leaves cancels this coroutine: its generation stops too
            return await self._whole(events, work, route=route, started=started)
        finally:
            cancelled.set()

    async def _stream(self, events: ThreadEvents, work: Job, *, route: str, started: float,
                      cancelled: threading.Event) -> StreamingResponse:
        try:
            version = (await events.next()).version
        except BaseException:
            cancelled.set()
            raise
        reply = Reply(chat=work.chat, model=f"{self.name}:{version}",
                      prompt_tokens=len(work.prompt))
        chunks = self._chunks(events, reply, work, route=route, started=started,
                              cancelled=cancelled)
        return StreamingResponse(chunks, media_type="text/event-stream",
                                 headers={VERSION_HEADER: version})

    async def _whole(self, events: ThreadEvents, work: Job, *, route: str,
                     started: float) -> JSONResponse:
        version = (await events.next()).version
        reply = Reply(chat=work.chat, model=f"{self.name}:{version}",
                      prompt_tokens=len(work.prompt))
        headers = {VERSION_HEADER: version}
        pieces, finished = [], None
        while finished is None:
            event = await events.next()
            if isinstance(event, Piece):
                pieces.append(event.text)
            elif isinstance(event, Finished):
                finished = event
        self._record(route, started, work, finished)
        return JSONResponse(reply.whole("".join(pieces), reason=finished.reason,
                                        completion_tokens=finished.completion_tokens),
                            headers=headers)

    async def _chunks(self, events: ThreadEvents, reply: Reply, work: Job, *, route: str,
                      started: float, cancelled: threading.Event) -> AsyncIterator[bytes]:
        finished = None
        try:
            if work.chat:
                yield sse(reply.chunk(None, first=True))
            while finished is None:
                event = await events.next()
                if isinstance(event, Piece):
                    yield sse(reply.chunk(event.text))
                elif isinstance(event, Finished):
                    finished = event
            yield sse(reply.chunk(None, reason=finished.reason))
            if work.include_usage:
                yield sse(reply.usage_chunk(finished.completion_tokens))
            yield sse("[DONE]")
        finally:
            cancelled.set()  # a client that left stops the generation at its next token
            if finished is not None:
                self._record(route, started, work, finished)

    def _record(self, route: str, started: float, work: Job, finished: Finished) -> None:
        self.metrics.request(route=route, code=200, seconds=time.perf_counter() - started,
                             prompt_tokens=len(work.prompt),
                             completion_tokens=finished.completion_tokens)

    def _authorize(self, request: Request) -> None:
        expected = self.options.api_key_sha256
        if expected is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(key_digest(given) or "", expected):
            raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer KEY` "
                           f"with the key given to `tributary serve --api-key` (or {API_KEY_ENV})",
                           code="invalid_api_key")

    def _check_model(self, request):
        served = (self.name, f"{self.name}:{self.backend.version}")
        if request.model not in served:
            raise ApiError(404, f"model {request.model!r} is not served here; use "
                           f"{self.name!r} (the newest accepted version, now "
                           f"{self.backend.version}); an older version needs its own "
                           "`tributary serve RUN_DIR --version vNNNN`", param="model",
                           code="model_not_found")
        return request


def start_serving(options: ServeOptions, *, app_name: str = "tributary",
                  route_prefix: str = "/") -> str:
    """Deploy on the Ray cluster this process is connected to; returns the API's base URL
    once every replica is up."""
    from cluster.connect import is_loopback

    if not is_loopback(options.host) and options.api_key_sha256 is None:
        raise ValueError(f"serving on {options.host} exposes the model beyond this machine: "
                         f"give an API key (--api-key or {API_KEY_ENV}) that requests must "
                         "present, or serve on 127.0.0.1")
    serve.start(http_options={"host": options.host, "port": options.port},
                proxy_location="HeadOnly")
    deployment = ModelServer.options(
        num_replicas=options.replicas,
        ray_actor_options={"num_cpus": options.num_cpus, "num_gpus": options.num_gpus,
                           "runtime_env": {"env_vars": _replica_env()}})
    # No access log line per request (a load would flood the driver's console); the request
    # counts and latencies are in the tributary_serve_* metrics.
    serve.run(deployment.bind(options), name=app_name, route_prefix=route_prefix,
              logging_config={"enable_access_log": False})
    return f"http://{options.host}:{options.port}{route_prefix.rstrip('/')}"


def _replica_env() -> dict[str, str]:
    """Where replicas find the converted model cache (as this process does)."""
    return {k: os.environ[k] for k in ("TRIBUTARY_CACHE",) if k in os.environ}
