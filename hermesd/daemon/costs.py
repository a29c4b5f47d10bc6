"""What a job will cost, checked before it is queued: token ids against the vocabulary, the size of a
``forward`` output, stop strings.

The executor runs one job at a time and a job that is refused only after its compute has already
spent the memory (a 3 GiB logits tensor) or the time (stop-string matching over hundreds of strings).
So each cost is estimated from the model's config (the store's manifest) and the job's shape, and a job
over a limit gets ``invalid_params`` naming the config field that sets the limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hermes_client.protocol import ErrorCode

from hermesd.daemon.config import ModelSettings, Settings
from hermesd.errors import Refused
from hermesd.images import allowed_path, image_pixels
from hermesd.images import refused as refused_image
from hermesd.store.manifest import Manifest
from hermesd.tasks import task_problem

TOKENS_PER_TEXT_SLACK = 8  # special tokens a tokenizer may add around a text (BOS, EOS, CLS, SEP, ...)
LOGIT_HEADS = ("ForCausalLM", "LMHeadModel", "ForMaskedLM")
ROW_HEADS = ("ForSequenceClassification", "ForImageClassification")
TOKEN_HEADS = ("ForTokenClassification",)


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a model that set the cost of a job: from its config, without loading it."""

    architecture: str
    vocab_size: int | None
    hidden_size: int | None
    num_labels: int | None

    @classmethod
    def of(cls, manifest: Manifest) -> "ModelShape":
        config = manifest.config
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}

        def first(*names: str) -> int | None:
            for source in (config, text):
                for name in names:
                    if isinstance(source.get(name), int) and source[name] > 0:
                        return source[name]
            return None

        labels = config.get("id2label")
        return cls(architecture=manifest.architecture, vocab_size=first("vocab_size"),
                   hidden_size=first("hidden_size", "n_embd", "d_model"),
                   num_labels=len(labels) if isinstance(labels, dict) and labels else first("num_labels"))

    def forward_widths(self) -> tuple[int | None, bool]:
        """(values per position of the largest output, whether it has one row of them per token)."""
        if self.architecture.endswith(LOGIT_HEADS):
            return self.vocab_size, True
        if self.architecture.endswith(ROW_HEADS):
            return self.num_labels, False
        if self.architecture.endswith(TOKEN_HEADS):
            return self.num_labels, True
        return self.hidden_size, True  # a bare encoder: last_hidden_state [rows, tokens, hidden]


def check_costs(task: str, inputs: Any, params: dict[str, Any], model: ModelSettings, shape: ModelShape,
                settings: Settings) -> None:
    """Refused(invalid_params) when the model cannot run the task or the job is over one of the limits;
    inputs are already type-checked."""
    problem = task_problem(task, shape.architecture)
    if problem is not None:
        raise Refused(ErrorCode.INVALID_PARAMS, problem)
    if task == "generate":
        _check_stops(params.get("stop") or (), settings)
    elif task == "forward":
        _check_forward(inputs, model, shape, settings)
    elif task == "classify":
        _check_images(inputs, shape, settings)


def _check_images(inputs: Any, shape: ModelShape, settings: Settings) -> None:
    """Image bytes within max_image_bytes and max_image_pixels (read from the header); file paths only
    under image_dirs. A text classifier takes no bytes."""
    items = inputs if isinstance(inputs, list) else [inputs]
    if not shape.architecture.endswith("ForImageClassification"):
        if any(isinstance(item, bytes) for item in items):
            raise Refused(ErrorCode.INVALID_PARAMS, f"{shape.architecture} classifies text: inputs must be strings")
        return
    policy = settings.image_policy()
    for index, item in enumerate(items):
        if isinstance(item, bytes):
            if len(item) > policy.max_bytes:
                raise Refused(ErrorCode.INVALID_PARAMS, f"image {index} is {len(item)} bytes; the limit is "
                                                        f"{policy.max_bytes} (max_image_bytes)")
            pixels = image_pixels(item)
            if pixels is None:
                raise Refused(ErrorCode.INVALID_PARAMS, f"image {index}: not an image Pillow can read")
            if pixels > policy.max_pixels:
                raise Refused(ErrorCode.INVALID_PARAMS, f"image {index} has {pixels} pixels; the limit is "
                                                        f"{policy.max_pixels} (max_image_pixels)")
        elif not policy.dirs:
            raise Refused(ErrorCode.INVALID_PARAMS, f"image {index}: file paths are not allowed by this daemon "
                                                    f"(image_dirs is empty); send the image's bytes")
        elif allowed_path(item, policy) is None:
            raise Refused(ErrorCode.INVALID_PARAMS, str(refused_image(index, policy)))


def _check_stops(stops: Any, settings: Settings) -> None:
    # Each stop string costs the decoder a scan per token (transformers' StopStringCriteria builds
    # tables over the vocabulary for each): the count and length are what make it slow.
    if len(stops) > settings.max_stop_strings:
        raise Refused(ErrorCode.INVALID_PARAMS, f"{len(stops)} stop strings; the limit is "
                                                f"{settings.max_stop_strings} (max_stop_strings)")
    longest = max((len(stop) for stop in stops), default=0)
    if longest > settings.max_stop_chars:
        raise Refused(ErrorCode.INVALID_PARAMS, f"a stop string of {longest} characters; the limit is "
                                                f"{settings.max_stop_chars} characters (max_stop_chars)")


def _is_token_rows(inputs: Any) -> bool:
    return isinstance(inputs, list) and bool(inputs) and all(isinstance(row, list) for row in inputs)


def _check_forward(inputs: Any, model: ModelSettings, shape: ModelShape, settings: Settings) -> None:
    if _is_token_rows(inputs):
        _check_token_ids(inputs, model, shape)
        rows, tokens = len(inputs), len(inputs[0])
    else:
        texts = [inputs] if isinstance(inputs, str) else inputs
        # A tokenizer makes at most about one token per UTF-8 byte; a longer input is refused by the
        # engine (max_prompt_tokens) before its compute, so that is the most one row can cost.
        longest = max(len(text.encode("utf-8", "surrogatepass")) for text in texts)
        rows, tokens = len(texts), min(longest + TOKENS_PER_TEXT_SLACK, model.max_prompt_tokens)
    width, per_token = shape.forward_widths()
    if width is None:
        return  # a config without the sizes: the run-time guard on output values still applies
    values = rows * (tokens if per_token else 1) * width
    size = values * 4  # results are sent as fp32 values
    if size > settings.max_forward_output_bytes:
        detail = f"{rows} rows × {tokens} tokens × {width}" if per_token else f"{rows} rows × {width}"
        raise Refused(ErrorCode.INVALID_PARAMS,
                      f"forward output of up to {size} bytes ({detail} values × 4 bytes) is over the "
                      f"{settings.max_forward_output_bytes}-byte limit (max_forward_output_bytes)")


def _check_token_ids(rows: list[list[int]], model: ModelSettings, shape: ModelShape) -> None:
    if shape.vocab_size is None:
        raise Refused(ErrorCode.INVALID_PARAMS, f"{shape.architecture} takes no token ids; send text")
    if len({len(row) for row in rows}) != 1:
        raise Refused(ErrorCode.INVALID_PARAMS, "token id rows must all have the same length")
    if len(rows[0]) > model.max_prompt_tokens:
        raise Refused(ErrorCode.INVALID_PARAMS, f"{len(rows[0])} tokens per row; this model's limit is "
                                                f"{model.max_prompt_tokens} (max_prompt_tokens)")
    highest = max(max(row) for row in rows)
    if highest >= shape.vocab_size:
        raise Refused(ErrorCode.INVALID_PARAMS, f"token id {highest} is outside this model's vocabulary "
                                                f"(0..{shape.vocab_size - 1})")
