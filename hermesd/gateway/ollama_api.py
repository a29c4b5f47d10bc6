"""Ollama's HTTP API (the subset its clients use), answered from the hermesd daemon.

Models are listed as ``NAME:latest`` (Ollama's tag); ``NAME`` and ``NAME:latest`` both name a model.
Responses stream as NDJSON unless the request says ``"stream": false``. Durations are nanoseconds:
``total_duration`` is the job's time from submit to result, ``eval_duration`` its run time.
A request's ``keep_alive`` is not honoured (each model's keep_alive is in the daemon's config), except
Ollama's unload request: an empty prompt with ``keep_alive: 0``.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from aiohttp import web

from hermesd.gateway import translate
from hermesd.gateway.common import (
    bridge_of,
    generating_model,
    iso,
    ndjson,
    now_iso,
    read_json,
    run_job,
    stream_job,
    wants_stream,
)
from hermesd.gateway.errors import GatewayError
from hermesd.version import __version__

NDJSON = "application/x-ndjson"
FOREVER = "2318-01-01T00:00:00Z"  # what Ollama reports as the expiry of a model kept loaded forever


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/api/generate", generate)
    router.add_post("/api/chat", chat)
    router.add_post("/api/embed", embed)
    router.add_post("/api/embeddings", embeddings)
    router.add_get("/api/tags", tags)
    router.add_get("/api/ps", ps)
    router.add_get("/api/version", version)
    router.add_post("/api/show", show)
    router.add_post("/api/pull", pull)


def error_body(exc: GatewayError) -> dict[str, Any]:
    """Ollama's error body: ``{"error": MESSAGE}`` (the ollama package raises ResponseError with it)."""
    return {"error": exc.message, "code": exc.code}


# -- text ---------------------------------------------------------------------------------------------
async def generate(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    model = await generating_model(request, body, "/api/embed")
    prompt = body.get("prompt")
    translate.require(isinstance(prompt, str), "field 'prompt' must be a string")
    if prompt == "":  # Ollama's load request, or with keep_alive 0 its unload request (`ollama stop`)
        if body.get("keep_alive") in (0, "0", "0s"):
            await bridge_of(request).unload(model)
            return web.json_response(_done(model, {"response": "", "done_reason": "unload"}, {}, 0.0))
        return web.json_response(_done(model, {"response": "", "done_reason": "load"}, {}, 0.0))
    translate.require(not body.get("images"), "images are not supported by hermesd's models", "unsupported")
    params = translate.ollama_params(body)
    if body.get("raw"):
        inputs, params["chat"] = prompt, False
    elif body.get("system"):
        inputs = [{"role": "system", "content": str(body["system"])}, {"role": "user", "content": prompt}]
    else:
        inputs = prompt
    return await _answer(request, body, model, inputs, params, lambda text: {"response": text})


async def chat(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    model = await generating_model(request, body, "/api/embed")
    translate.refuse_tools(body)
    messages = translate.chat_messages(body.get("messages"))
    return await _answer(request, body, model, messages, translate.ollama_params(body),
                         lambda text: {"message": {"role": "assistant", "content": text}})


async def _answer(request: web.Request, body: dict[str, Any], model: str, inputs: Any, params: dict[str, Any],
                  shape) -> web.StreamResponse:
    started = time.monotonic()
    if not wants_stream(body, default=True):
        result = await run_job(request, "generate", model, inputs, params)
        return web.json_response(_done(model, shape(result["text"]), result, time.monotonic() - started))

    def render_text(job_id: str, piece: str) -> bytes:
        return ndjson({"model": model, "created_at": now_iso(), **shape(piece), "done": False})

    def render(result: dict[str, Any], waited: float) -> list[bytes]:
        return [ndjson(_done(model, shape(""), result, time.monotonic() - started))]

    return await stream_job(request, "generate", model, inputs, params, NDJSON, lambda job_id: (), render,
                            lambda exc: ndjson(error_body(exc)), render_text)


def _done(model: str, shaped: dict[str, Any], result: dict[str, Any], took_s: float) -> dict[str, Any]:
    """The final object of a generate or chat answer, with Ollama's counts and durations."""
    run_s = result.get("stats", {}).get("wall_s", 0.0)
    return {"model": model, "created_at": now_iso(), **shaped, "done": True,
            "done_reason": shaped.get("done_reason") or result.get("finish_reason", "stop"),
            "total_duration": int(took_s * 1e9), "load_duration": 0,
            "prompt_eval_count": result.get("prompt_tokens", 0), "eval_count": result.get("new_tokens", 0),
            "eval_duration": int(run_s * 1e9)}


# -- embeddings ---------------------------------------------------------------------------------------
async def embed(request: web.Request) -> web.Response:
    """/api/embed: unit-length vectors, as Ollama returns them."""
    body = await read_json(request)
    model = (await bridge_of(request).model(translate.model_name(body)))["name"]
    translate.require(body.get("dimensions") is None, "field 'dimensions' is not supported", "unsupported")
    started = time.monotonic()
    result = await run_job(request, "embed", model, translate.texts(body.get("input"), "input"), {"normalize": True})
    return web.json_response({"model": model, "embeddings": result["embeddings"],
                              "total_duration": int((time.monotonic() - started) * 1e9), "load_duration": 0,
                              "prompt_eval_count": 0})


async def embeddings(request: web.Request) -> web.Response:
    """/api/embeddings (Ollama's older endpoint): one prompt, the model's own (unnormalised) vector."""
    body = await read_json(request)
    model = (await bridge_of(request).model(translate.model_name(body)))["name"]
    prompt = body.get("prompt")
    translate.require(isinstance(prompt, str) and prompt != "", "field 'prompt' must be a non-empty string")
    result = await run_job(request, "embed", model, [prompt], {})
    return web.json_response({"embedding": result["embeddings"][0]})


# -- models -------------------------------------------------------------------------------------------
def details(model: dict[str, Any]) -> dict[str, Any]:
    """Ollama's ``details`` of a hermesd model."""
    quant = model.get("quantization") or []
    return {"parent_model": "", "format": "hermesd", "family": model["architecture"],
            "families": [model["architecture"]], "parameter_size": "",
            "quantization_level": ",".join(quant) if quant else model.get("dtype", "")}


def _listed(model: dict[str, Any]) -> dict[str, Any]:
    digest = hashlib.sha256(f"{model['name']}\0{model['store']}\0{model.get('store_modified', 0)}".encode()).hexdigest()
    return {"name": f"{model['name']}:latest", "model": f"{model['name']}:latest",
            "modified_at": iso(model.get("store_modified", 0)), "size": model.get("weight_bytes", 0),
            "digest": digest, "details": details(model)}


async def tags(request: web.Request) -> web.Response:
    return web.json_response({"models": [_listed(m) for m in await bridge_of(request).models()]})


async def ps(request: web.Request) -> web.Response:
    """Loaded models, with the memory their plan holds between jobs (resident stages and the ring) and
    when their keep_alive releases them."""
    loaded = []
    for model in (await bridge_of(request).request("models"))["models"]:
        if not model.get("loaded", True):
            continue
        plan = model.get("plan") or {}
        held = plan.get("resident_bytes", 0) + plan.get("pool_bytes", 0)
        keep = model.get("keep_alive_s", -1)
        expires = FOREVER if keep < 0 else iso(time.time() + max(0.0, keep - model.get("idle_s", 0.0)))
        loaded.append({**_listed(model), "expires_at": expires, "size": held, "size_vram": 0,
                       "context_length": model.get("max_prompt_tokens")})
    return web.json_response({"models": loaded})


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": __version__})


async def show(request: web.Request) -> web.Response:
    body = await read_json(request)
    name = body.get("model", body.get("name"))
    translate.require(isinstance(name, str) and name != "", "field 'model' must name a model")
    model = await bridge_of(request).model(name)
    defaults = model.get("defaults", {}).get("generate", {})
    return web.json_response({
        "modelfile": f"# hermesd model {model['name']}: store {model['store']}\n", "template": "",
        "parameters": "\n".join(f"{key} {value}" for key, value in sorted(defaults.items())),
        "details": details(model), "capabilities": translate.capabilities(model),
        "modified_at": iso(model.get("store_modified", 0)),
        "model_info": {"general.architecture": model["architecture"], "hermesd.stages": model.get("stages"),
                       "hermesd.plan": model.get("plan_summary"), "hermesd.max_prompt_tokens": model.get(
                           "max_prompt_tokens"), "hermesd.max_new_tokens": model.get("max_new_tokens")}})


async def pull(request: web.Request) -> web.Response:
    """hermesd never downloads models: say how to convert one locally instead."""
    body = await read_json(request)
    name = str(body.get("model", body.get("name", "NAME"))).removesuffix(":latest") or "NAME"
    raise GatewayError("not_implemented", (
        f"hermesd does not download models; convert one locally: `hermesd convert SOURCE "
        f"/var/lib/hermesd/stores/{name}` (a Hugging Face directory or a .gguf file), then add "
        f"[models.{name}] with store = \"/var/lib/hermesd/stores/{name}\" to /etc/hermesd/hermesd.toml "
        f"and `systemctl reload hermesd`"))
