"""Request fields of the Ollama and OpenAI APIs translated into hermesd job inputs and parameters.

Mapped: temperature, top_p, top_k, seed, the token limit (Ollama ``num_predict``, OpenAI
``max_tokens``/``max_completion_tokens``) and stop strings. Options hermesd has no use for
(``num_ctx``, ``repeat_penalty``, ``num_thread``, ...) are ignored, as Ollama ignores options a model
does not use; values of the mapped ones are checked by the daemon (a bad one: 400). Absent options
take the model's configured defaults, so decoding is greedy unless a temperature is given.
"""

from __future__ import annotations

from typing import Any

from hermesd.gateway.errors import GatewayError

SAMPLING = ("temperature", "top_p", "top_k", "seed")


def require(condition: bool, message: str, code: str = "bad_request") -> None:
    """Raise a 400-class GatewayError when ``condition`` does not hold."""
    if not condition:
        raise GatewayError(code, message)


def model_name(body: dict[str, Any]) -> str:
    """The request's ``model``: a non-empty string."""
    model = body.get("model")
    require(isinstance(model, str) and model != "", "field 'model' must name a model")
    return model


def _stop(value: Any) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else value  # a list of non-strings is refused by the daemon


def ollama_params(body: dict[str, Any]) -> dict[str, Any]:
    """hermesd generate params from an Ollama request's ``options``."""
    options = body.get("options") or {}
    require(isinstance(options, dict), "field 'options' must be an object")
    params = {key: options[key] for key in SAMPLING if options.get(key) is not None}
    predict = options.get("num_predict")
    if predict is not None and not (isinstance(predict, int) and predict < 0):  # -1, -2: "no limit" in Ollama
        params["max_new_tokens"] = predict
    if (stop := _stop(options.get("stop"))) is not None:
        params["stop"] = stop
    return params


def openai_params(body: dict[str, Any]) -> dict[str, Any]:
    """hermesd generate params from an OpenAI completion request."""
    require(body.get("n") in (None, 1), "only n = 1 is supported")
    params = {key: body[key] for key in ("temperature", "top_p", "seed") if body.get(key) is not None}
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        params["max_new_tokens"] = limit
    if (stop := _stop(body.get("stop"))) is not None:
        params["stop"] = stop
    return params


def chat_messages(messages: Any) -> list[dict[str, str]]:
    """Chat messages as hermesd takes them: ``[{role, content}]`` with text content.

    OpenAI's list-of-parts content is joined when every part is text; images and tool calls are
    refused (hermesd's models are text-only and do not call tools).
    """
    require(isinstance(messages, list) and messages != [], "field 'messages' must be a non-empty list")
    plain = []
    for index, message in enumerate(messages):
        require(isinstance(message, dict) and isinstance(message.get("role"), str),
                f"message {index} must be an object with a 'role'")
        require(not message.get("images") and not message.get("tool_calls"),
                f"message {index}: images and tool calls are not supported by hermesd's models", "unsupported")
        plain.append({"role": message["role"], "content": _text(message.get("content"), index)})
    return plain


def _text(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, list):
        require(all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content),
                f"message {index}: only text content parts are supported", "unsupported")
        return "".join(part["text"] for part in content)
    require(isinstance(content, str), f"message {index}: 'content' must be a string")
    return content


def refuse_tools(body: dict[str, Any]) -> None:
    """Tools (function calling) are refused with a clear error: no hermesd model calls them."""
    require(not body.get("tools") and not body.get("functions"),
            "this model cannot call tools: hermesd runs plain text generation (remove 'tools')", "unsupported")


def texts(value: Any, field: str) -> list[str]:
    """Embedding inputs: a string or a non-empty list of strings (token arrays are refused)."""
    items = [value] if isinstance(value, str) else value
    require(isinstance(items, list) and items != [] and all(isinstance(t, str) for t in items),
            f"field '{field}' must be a string or a non-empty list of strings")
    return items


def can_generate(model: dict[str, Any]) -> bool:
    """Whether a model (from the daemon's ``models`` reply) is a causal language model."""
    return model["architecture"].endswith(("ForCausalLM", "LMHeadModel"))


def capabilities(model: dict[str, Any]) -> list[str]:
    """Ollama's capability names for a model."""
    if can_generate(model):
        return ["completion"]
    if model["architecture"].endswith("ForSequenceClassification"):
        return ["classification"]
    return ["embedding"]
