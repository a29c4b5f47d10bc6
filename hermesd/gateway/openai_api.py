"""OpenAI's HTTP API (chat completions, completions, embeddings, models), answered from the daemon.

``stream: true`` answers with server-sent events: a first chunk naming the assistant's role, the
text in chunks as the daemon's progress messages bring it, a last chunk with the finish reason, then ``data: [DONE]``. Absent sampling fields take the model's defaults
(greedy decoding), not OpenAI's temperature 1. Embeddings are unit-length, as OpenAI's are, and
come as floats or base64 (``encoding_format``; the ``openai`` package asks for base64).
"""

from __future__ import annotations

import base64
import struct
import time
from typing import Any

from aiohttp import web

from hermesd.gateway import translate
from hermesd.gateway.common import bridge_of, generating_model, read_json, run_job, sse, stream_job, wants_stream
from hermesd.gateway.errors import GatewayError

SSE = "text/event-stream"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               503: "service_unavailable", 504: "timeout"}


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/v1/chat/completions", chat_completions)
    router.add_post("/v1/completions", completions)
    router.add_post("/v1/embeddings", embeddings)
    router.add_get("/v1/models", models)


def error_body(exc: GatewayError) -> dict[str, Any]:
    """OpenAI's error object; ``code`` is hermesd's stable error code."""
    return {"error": {"message": exc.message, "type": ERROR_TYPES.get(exc.status, "server_error"),
                      "param": None, "code": exc.code}}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    model = await generating_model(request, body, "/v1/embeddings")
    translate.refuse_tools(body)
    messages = translate.chat_messages(body.get("messages"))
    return await _complete(request, body, model, messages, translate.openai_params(body), chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    """Plain text completion: the prompt is continued as it is, without the chat template."""
    body = await read_json(request)
    model = await generating_model(request, body, "/v1/embeddings")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    translate.require(isinstance(prompt, str) and prompt != "", "field 'prompt' must be a non-empty string")
    params = {**translate.openai_params(body), "chat": False}
    return await _complete(request, body, model, prompt, params, chat=False)


async def _complete(request: web.Request, body: dict[str, Any], model: str, inputs: Any, params: dict[str, Any],
                    chat: bool) -> web.StreamResponse:
    created = int(time.time())

    def envelope(job_id: str, choice: dict[str, Any], chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{job_id}", "object": kind, "created": created,
                "model": model, "choices": [{"index": 0, "logprobs": None, **choice}]}

    if not wants_stream(body, default=False):
        result = await run_job(request, "generate", model, inputs, params)
        text = {"message": {"role": "assistant", "content": result["text"]}} if chat else {"text": result["text"]}
        return web.json_response({**envelope(result["job_id"], {**text, "finish_reason": result["finish_reason"]},
                                             False), "usage": _usage(result)})

    def render_text(job_id: str, piece: str) -> bytes:
        text = {"delta": {"content": piece}} if chat else {"text": piece}
        return sse(envelope(job_id, {**text, "finish_reason": None}, True))

    def render(result: dict[str, Any], waited: float) -> list[bytes]:
        end = {"delta": {}} if chat else {"text": ""}
        return [sse({**envelope(result["job_id"], {**end, "finish_reason": result["finish_reason"]}, True),
                     "usage": _usage(result)}),
                sse("[DONE]")]

    def first(job_id: str) -> list[bytes]:
        role = {"delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        return [sse(envelope(job_id, role, True))] if chat else []

    return await stream_job(request, "generate", model, inputs, params, SSE, first, render,
                            lambda exc: sse(error_body(exc)) + sse("[DONE]"), render_text)


def _usage(result: dict[str, Any]) -> dict[str, int]:
    prompt, new = result.get("prompt_tokens", 0), result.get("new_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}


async def embeddings(request: web.Request) -> web.Response:
    body = await read_json(request)
    model = (await bridge_of(request).model(translate.model_name(body)))["name"]
    encoding = body.get("encoding_format") or "float"
    translate.require(encoding in ("float", "base64"), "field 'encoding_format' must be 'float' or 'base64'")
    translate.require(body.get("dimensions") is None, "field 'dimensions' is not supported", "unsupported")
    result = await run_job(request, "embed", model, translate.texts(body.get("input"), "input"), {"normalize": True})
    data = [{"object": "embedding", "index": index, "embedding": _encoded(vector, encoding)}
            for index, vector in enumerate(result["embeddings"])]
    return web.json_response({"object": "list", "data": data, "model": model,
                              "usage": {"prompt_tokens": 0, "total_tokens": 0}})


def _encoded(vector: list[float], encoding: str) -> list[float] | str:
    """float: the list; base64: little-endian float32 bytes, as OpenAI sends them."""
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


async def models(request: web.Request) -> web.Response:
    listed = [{"id": m["name"], "object": "model", "created": int(m.get("store_modified", 0)), "owned_by": "hermesd"}
              for m in await bridge_of(request).models()]
    return web.json_response({"object": "list", "data": listed})
