"""The tasks a loaded model serves: generate, embed, classify, forward.

Each task validates its parameters (raising TaskError with a message fit for a client), runs the
model's own ``generate``/``forward``, and returns JSON-ready data. These are also the job types of
the daemon's protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from hermes_client.protocol import MAX_FORWARD_VALUES, MAX_NEW_TOKENS, TASK_NAMES, is_int, is_number
from transformers import StoppingCriteriaList

from hermesd.decoding import StepControl
from hermesd.engine.engine import Engine
from hermesd.errors import TaskError
from hermesd.images import ImagePolicy, open_images
from hermesd.textstream import TextStream


@dataclass(frozen=True)
class GenerateParams:
    """Decoding settings; temperature 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    chat: bool | None = None  # None: use the chat template when the tokenizer has one

    def __post_init__(self) -> None:
        # Bools are refused where numbers are expected: true is not 1 in the protocol.
        _require(is_int(self.max_new_tokens) and 1 <= self.max_new_tokens <= MAX_NEW_TOKENS,
                 f"max_new_tokens must be an integer in 1..{MAX_NEW_TOKENS}")
        _require(is_number(self.temperature) and 0 <= self.temperature <= 10,
                 "temperature must be a number in 0..10")
        _require(is_number(self.top_p) and 0 < self.top_p <= 1, "top_p must be a number in (0, 1]")
        _require(is_int(self.top_k) and self.top_k >= 0, "top_k must be a non-negative integer")
        _require(self.seed is None or (is_int(self.seed) and 0 <= self.seed < 1 << 63),
                 "seed must be an integer in 0..2^63-1")
        _require(isinstance(self.stop, (tuple, list)) and all(isinstance(s, str) and s for s in self.stop),
                 "stop must be a list of non-empty strings")
        _require(self.chat is None or isinstance(self.chat, bool), "chat must be true or false")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise TaskError(message)


MAX_INPUTS = 256  # texts or images in one job


def run_task(engine: Engine, task: str, inputs: Any, params: dict[str, Any] | None = None,
             on_token: Callable[[int], None] | None = None, check: Callable[[], None] | None = None,
             images: ImagePolicy = ImagePolicy(), on_text: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Dispatch ``task`` with ``inputs`` and keyword ``params``; unknown params are refused.

    ``check`` is called after tokenizing and after each generated token; it may raise to end the job
    (the daemon's cancel and deadline), as the engine's stage checkpoints do between stages.
    ``images``: where image files may come from and how large images may be (classify).
    ``on_text`` (generate): called with each piece of new text as it becomes final (hermesd.textstream);
    the pieces, in order, make up the result's ``text`` exactly.
    """
    params = check_params(task, params or {})
    if task == "generate":
        return generate(engine, inputs, _build(GenerateParams, params), on_token=on_token, check=check,
                        on_text=on_text)
    if task == "embed":
        return embed(engine, inputs, **params)
    if task == "classify":
        return classify(engine, inputs, **params, images=images)
    return forward(engine, inputs)


def check_params(task: str, params: dict[str, Any]) -> dict[str, Any]:
    """Validate a task's parameters without a model (the daemon does this before accepting a job).

    Returns the parameters normalised (``stop`` as a tuple); raises TaskError naming the problem.
    """
    _require(task in TASK_NAMES, f"unknown task {task!r}; tasks are {', '.join(TASK_NAMES)}")
    params = dict(params)
    if task == "generate":
        if isinstance(params.get("stop"), list):  # a string or a map is refused, not iterated
            params["stop"] = tuple(params["stop"])
        _build(GenerateParams, params)
    elif task == "embed":
        _known(params, "normalize", "pooling")
        _embed_options(params.get("normalize", False), params.get("pooling", "mean"))
    elif task == "classify":
        _known(params, "top_k")
        _classify_options(params.get("top_k", 5))
    else:
        _known(params)
    return params


def check_inputs(task: str, inputs: Any) -> None:
    """Validate a task's inputs by shape and type, without a model; raises TaskError."""
    if task == "generate":
        if isinstance(inputs, list):
            _require(0 < len(inputs) <= MAX_INPUTS and all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str)
                for m in inputs), "chat messages must be a non-empty list of {role, content} strings")
        else:
            _require(isinstance(inputs, str) and inputs != "", "prompt must be a non-empty string")
    elif task == "forward" and isinstance(inputs, list) and inputs and all(isinstance(r, list) for r in inputs):
        _require(len(inputs) <= MAX_INPUTS and all(r and all(is_int(t) and t >= 0 for t in r) for r in inputs),
                 "token ids must be non-empty lists of non-negative integers")
    elif task == "classify" and (isinstance(inputs, bytes) or isinstance(inputs, list) and any(
            isinstance(item, bytes) for item in inputs)):
        items = [inputs] if isinstance(inputs, bytes) else inputs
        _require(0 < len(items) <= MAX_INPUTS and all(isinstance(i, (str, bytes)) and i for i in items),
                 f"inputs must be 1..{MAX_INPUTS} non-empty strings or images (bytes)")
    else:
        _require(len(_texts(inputs)) <= MAX_INPUTS, f"at most {MAX_INPUTS} inputs per job")


def _build(cls: type, params: dict[str, Any]) -> Any:
    try:
        return cls(**params)
    except TypeError as exc:
        raise TaskError(f"bad parameters: {exc}") from None


def _known(params: dict[str, Any], *names: str) -> dict[str, Any]:
    unknown = sorted(set(params) - set(names))
    _require(not unknown, f"unknown parameter(s) {unknown}; allowed: {list(names)}")
    return params


def _texts(inputs: Any) -> list[str]:
    texts = [inputs] if isinstance(inputs, str) else inputs
    _require(isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts),
             "inputs must be a string or a non-empty list of strings")
    return texts


def _check_length(engine: Engine, input_ids: torch.Tensor) -> None:
    """Refuse inputs longer than the engine's plan was made for (its memory budget assumes the length)."""
    limit = engine.max_input_tokens
    # Text of only spaces (or nothing a word-level tokenizer knows) can make no tokens at all; a model
    # given zero positions fails deep inside (found by tests/test_daemon_fuzz.py).
    _require(input_ids.shape[-1] > 0, "the input makes no tokens; send some text")
    _require(limit is None or input_ids.shape[-1] <= limit,
             f"input of {input_ids.shape[-1]} tokens is longer than this model's limit of {limit} tokens")


def task_problem(task: str, architecture: str) -> str | None:
    """Why a model of ``architecture`` cannot run ``task`` (None: it can). The daemon asks at submit."""
    if task == "generate" and not architecture.endswith(("ForCausalLM", "LMHeadModel")):
        return f"{architecture} is not a causal language model: it cannot generate"
    if task == "classify" and not architecture.endswith(("ForSequenceClassification", "ForImageClassification")):
        return f"{architecture} has no classification head"
    return None


# -- generate -----------------------------------------------------------------------------------
def generate(engine: Engine, prompt: str | list[dict[str, str]], params: GenerateParams = GenerateParams(),
             on_token: Callable[[int], None] | None = None, check: Callable[[], None] | None = None,
             on_text: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Continue ``prompt`` (text, or chat messages) and return the new text (``on_text``: see run_task)."""
    problem = task_problem("generate", engine.manifest.architecture)
    _require(problem is None, problem or "")
    tokenizer = engine.tokenizer
    input_ids = _prompt_ids(tokenizer, prompt, params.chat)
    _check_length(engine, input_ids)
    if check is not None:
        check()  # a long prompt takes a while to tokenize: a cancel meanwhile ends the job here
    kwargs: dict[str, Any] = {"max_new_tokens": params.max_new_tokens, "attention_mask": torch.ones_like(input_ids)}
    if params.temperature > 0:
        kwargs.update(do_sample=True, temperature=float(params.temperature), top_p=float(params.top_p),
                      top_k=params.top_k or None)
        if params.seed is not None:
            torch.manual_seed(params.seed)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    kwargs["stopping_criteria"] = StoppingCriteriaList([StepControl(tokenizer, input_ids.shape[1], params.stop,
                                                                    check)])
    stream = TextStream(tokenizer, params.stop) if on_text is not None else None
    if on_token is not None or stream is not None:
        kwargs["streamer"] = _TokenCounter(on_token, stream, on_text)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        output = engine.model.generate(input_ids, pad_token_id=pad, **kwargs)
    new_ids = output[0, input_ids.shape[1]:].tolist()
    text, stopped = _cut_at_stop(tokenizer.decode(new_ids, skip_special_tokens=True), params.stop)
    if stream is not None and (rest := stream.flush()):
        on_text(rest)
    hit_eos = bool(new_ids) and new_ids[-1] in _eos_ids(engine, tokenizer)
    finish = "stop" if stopped or hit_eos else ("length" if len(new_ids) >= params.max_new_tokens else "stop")
    return {"text": text, "prompt_tokens": int(input_ids.shape[1]), "new_tokens": len(new_ids),
            "finish_reason": finish}


def _prompt_ids(tokenizer: Any, prompt: Any, chat: bool | None) -> torch.Tensor:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(prompt, list):
        _require(has_template, "chat messages need a tokenizer with a chat template")
        _require(all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in prompt),
                 "messages must be a list of {role, content} objects")
        messages = prompt
    else:
        _require(isinstance(prompt, str) and prompt != "", "prompt must be a non-empty string")
        if not (has_template and chat is not False):
            return tokenizer(prompt, return_tensors="pt").input_ids
        messages = [{"role": "user", "content": prompt}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
    return encoded["input_ids"]


def _eos_ids(engine: Engine, tokenizer: Any) -> set[int]:
    ids = engine.model.generation_config.eos_token_id
    found = set(ids if isinstance(ids, list) else [ids]) if ids is not None else set()
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return found


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stops if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


class _TokenCounter:
    """A transformers streamer that reports each generated token id (for progress) and, with a
    TextStream, the text that became final with it (before the token, so a progress message sent
    for the token carries its text)."""

    def __init__(self, on_token: Callable[[int], None] | None, stream: TextStream | None = None,
                 on_text: Callable[[str], None] | None = None) -> None:
        self._on_token = on_token
        self._stream = stream
        self._on_text = on_text
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate first puts the prompt itself
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            if self._stream is not None and (piece := self._stream.push(int(token))):
                self._on_text(piece)
            if self._on_token is not None:
                self._on_token(int(token))

    def end(self) -> None:
        pass


# -- embed ----------------------------------------------------------------------------------------
def embed(engine: Engine, inputs: str | list[str], normalize: bool = False, pooling: str = "mean") -> dict[str, Any]:
    """One vector per input text: mean (default) or CLS pooling of the last hidden states."""
    texts = _texts(inputs)
    _embed_options(normalize, pooling)
    encoded = engine.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    _check_length(engine, encoded["input_ids"])
    with torch.inference_mode():
        output = engine.model(**encoded, output_hidden_states=True)
    hidden = getattr(output, "last_hidden_state", None)
    hidden = hidden if hidden is not None else output.hidden_states[-1]  # hidden: [B, S, D]
    if pooling == "cls":
        vectors = hidden[:, 0]
    else:
        mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, S, 1]
        vectors = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    if normalize:
        vectors = torch.nn.functional.normalize(vectors.float(), dim=-1)
    return {"embeddings": vectors.float().tolist(), "dimensions": int(vectors.shape[-1])}


def _embed_options(normalize: Any, pooling: Any) -> None:
    _require(pooling in ("mean", "cls"), "pooling must be 'mean' or 'cls'")
    _require(isinstance(normalize, bool), "normalize must be true or false")


# -- classify -------------------------------------------------------------------------------------
def classify(engine: Engine, inputs: str | list[str | bytes], top_k: int = 5,
             images: ImagePolicy = ImagePolicy()) -> dict[str, Any]:
    """Labels with softmax scores for each input: texts, or for image models images (bytes) or the
    paths of image files that ``images`` allows."""
    problem = task_problem("classify", engine.manifest.architecture)
    _require(problem is None, problem or "")
    _classify_options(top_k)
    if engine.model.main_input_name == "pixel_values":
        items = [inputs] if isinstance(inputs, (str, bytes)) else inputs
        _require(isinstance(items, list) and items, "inputs must be images (bytes) or image file paths")
        batch = {"pixel_values": engine.image_processor(images=open_images(items, images),
                                                        return_tensors="pt").pixel_values}
    else:
        items = _texts(inputs)
        batch = dict(engine.tokenizer(items, padding=True, truncation=True, return_tensors="pt"))
        _check_length(engine, batch["input_ids"])
    with torch.inference_mode():
        logits = engine.model(**batch).logits.float()  # logits: [B, num_labels]
    probabilities = logits.softmax(-1)
    labels = engine.model.config.id2label
    results = []
    for row in probabilities:
        scores, indices = row.topk(min(top_k, row.numel()))
        results.append([{"label": labels.get(int(i), str(int(i))), "score": float(s)} for s, i in zip(scores, indices)])
    return {"labels": results}


def _classify_options(top_k: Any) -> None:
    _require(is_int(top_k) and top_k >= 1, "top_k must be a positive integer")


# -- forward --------------------------------------------------------------------------------------
def forward(engine: Engine, inputs: str | list[str] | list[list[int]]) -> dict[str, Any]:
    """Raw model outputs for text (tokenized) or token ids: each output's shape, dtype and values."""
    if isinstance(inputs, list) and inputs and all(isinstance(row, list) for row in inputs):
        _require(all(all(isinstance(t, int) for t in row) for row in inputs) and len({len(r) for r in inputs}) == 1,
                 "token ids must be equal-length lists of integers")
        batch = {"input_ids": torch.tensor(inputs)}
    else:
        batch = dict(engine.tokenizer(_texts(inputs), padding=True, return_tensors="pt"))
    if "input_ids" in batch:
        _check_length(engine, batch["input_ids"])
    with torch.inference_mode():
        output = engine.model(**batch)
    result = {}
    for name, value in output.items():
        if isinstance(value, torch.Tensor):
            _require(value.numel() <= MAX_FORWARD_VALUES, f"output {name} has {value.numel()} values; too large")
            result[name] = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch."),
                            "values": value.float().tolist()}
    return {"outputs": result}
