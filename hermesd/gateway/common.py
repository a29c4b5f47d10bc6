"""What the gateway's API modules share: the application's keys, JSON bodies, streamed responses."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from hermesd.gateway import translate
from hermesd.gateway.bridge import DaemonBridge, DaemonJob
from hermesd.gateway.config import GatewaySettings
from hermesd.gateway.errors import GatewayError
from hermesd.gateway.metrics import GatewayMetrics

BRIDGE = web.AppKey("bridge", DaemonBridge)
SETTINGS = web.AppKey("settings", GatewaySettings)
METRICS = web.AppKey("metrics", GatewayMetrics)


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body; anything else is a 400 ``bad_json``."""
    try:
        body = json.loads(await request.read() or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise GatewayError("bad_json", f"the request body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise GatewayError("bad_json", "the request body must be a JSON object")
    return body


def bridge_of(request: web.Request) -> DaemonBridge:
    return request.app[BRIDGE]


async def generating_model(request: web.Request, body: dict[str, Any], embed_endpoint: str) -> str:
    """The configured name of the text-generating model ``body`` names; a clear error naming
    ``embed_endpoint`` (this API's embeddings route) when the model only embeds or classifies."""
    name = translate.model_name(body)
    model = await bridge_of(request).model(name)
    translate.require(translate.can_generate(model), f"model {name!r} does not generate text "
                      f"({model['architecture']}); use {embed_endpoint}", "unsupported")
    return model["name"]


def now_iso() -> str:
    """The current UTC time as RFC 3339 with a Z, as Ollama writes ``created_at``."""
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, timezone.utc).isoformat().replace("+00:00", "Z")


def wants_stream(body: dict[str, Any], default: bool) -> bool:
    """The request's ``stream`` flag (a bool), or the API's default."""
    stream = body.get("stream", default)
    if stream is None:
        return default
    if not isinstance(stream, bool):
        raise GatewayError("bad_request", "field 'stream' must be true or false")
    return stream


async def run_job(request: web.Request, task: str, model: str, inputs: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Submit a job and wait for its result (the caller answers in one response)."""
    job = DaemonJob(bridge_of(request))
    await job.submit(task, model, inputs, params)
    result = {**await job.result(), "job_id": job.job.id}
    request.app[METRICS].observe_result(task, model, result)
    return result


async def stream_job(request: web.Request, task: str, model: str, inputs: Any, params: dict[str, Any],
                     content_type: str, first, render, render_error, render_text) -> web.StreamResponse:
    """Submit a job; once accepted, answer 200 with a stream: ``first(job_id)``, then
    ``render_text(job_id, piece)`` for each piece of text as the daemon's progress messages bring it,
    then ``render(result, seconds)`` (which writes no text: the pieces were all of it).

    A refusal still gets its HTTP status (the job was never queued). A failure after the stream
    started is written into it with ``render_error`` (Ollama and OpenAI clients both read an error
    object there).
    """
    job = DaemonJob(bridge_of(request))
    job_id = await job.submit(task, model, inputs, params, progress=True)
    response = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
    await response.prepare(request)
    metrics = request.app[METRICS]
    for chunk in first(job_id):
        await _write(response, chunk, metrics)
    started = time.monotonic()

    async def text(piece: str) -> None:
        await _write(response, render_text(job_id, piece), metrics)

    try:
        result = {**await job.result(on_text=text), "job_id": job_id}
    except GatewayError as exc:
        chunks = [render_error(exc)]
    else:
        metrics.observe_result(task, model, result)
        chunks = render(result, time.monotonic() - started)
    for chunk in chunks:
        await _write(response, chunk, metrics)
    await response.write_eof()
    return response


async def _write(response: web.StreamResponse, chunk: bytes, metrics: GatewayMetrics) -> None:
    await response.write(chunk)
    metrics.observe_streamed(len(chunk))


def ndjson(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode() + b"\n"


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()
