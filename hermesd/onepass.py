"""One sweep for several one-pass jobs: ``embed``, ``classify`` and ``forward`` merged into one batch.

Jobs whose results do not depend on what they are batched with share a forward pass: their inputs
are concatenated (padded as one batch, attention masks keeping rows apart) and the outputs split back,
so each job gets the rows of its own inputs. What may merge:

- embed: the same ``normalize`` and ``pooling`` (pooling uses each row's own mask);
- classify: the same ``top_k`` and the same kind of input (texts, or images);
- forward: the same kind of input and the same padded length (its outputs are per position, and a
  longer pad would change their shape).
"""

from __future__ import annotations

from typing import Any

from hermesd.engine.engine import Engine
from hermesd.errors import TaskError
from hermesd.images import ImagePolicy
from hermesd.tasks import check_params, classify, embed, forward

ONE_PASS_TASKS = ("embed", "classify", "forward")


def _items(task: str, inputs: Any) -> list[Any]:
    if task == "forward" and isinstance(inputs, list) and inputs and all(isinstance(r, list) for r in inputs):
        return inputs
    return [inputs] if isinstance(inputs, (str, bytes)) else list(inputs)


def _is_ids(items: list[Any]) -> bool:
    return bool(items) and isinstance(items[0], list)


def merge_key(engine: Engine, task: str, inputs: Any, params: dict[str, Any]) -> tuple | None:
    """Jobs with equal keys may share a sweep; None: this job runs alone (or its inputs are invalid)."""
    if task not in ONE_PASS_TASKS:
        return None
    try:
        params = check_params(task, params)
        items = _items(task, inputs)
    except (TaskError, TypeError):
        return None
    if not items:
        return None
    if task == "embed":
        return (task, params.get("normalize", False), params.get("pooling", "mean"))
    if task == "classify":
        return (task, params.get("top_k", 5), any(isinstance(i, bytes) for i in items))
    if _is_ids(items):
        lengths = {len(r) for r in items}
        return (task, "ids", lengths.pop()) if len(lengths) == 1 else None
    if not all(isinstance(i, str) for i in items):
        return None
    return (task, "text", padded_length(engine, items))


def padded_length(engine: Engine, texts: list[Any]) -> int:
    """Tokens per row once ``texts`` are tokenized together (what the one-pass memory bound counts)."""
    if not texts or not isinstance(texts[0], str):
        return 1
    return max(len(ids) for ids in engine.tokenizer(list(texts), truncation=True)["input_ids"])


def row_count(task: str, inputs: Any) -> int:
    """Rows this job adds to a merged batch."""
    return len(_items(task, inputs))


def run_merged(engine: Engine, task: str, jobs: list[tuple[Any, dict[str, Any]]],
               images: ImagePolicy = ImagePolicy()) -> list[dict[str, Any]]:
    """Run jobs (inputs, params) of one merge key as one batch; each job's own result, in order.

    Raises TaskError if the merged batch is refused (the caller then runs the jobs one by one, so
    that each gets its own error or result).
    """
    parts = [_items(task, inputs) for inputs, _ in jobs]
    merged = [item for part in parts for item in part]
    params = check_params(task, jobs[0][1])
    if task == "embed":
        vectors = embed(engine, merged, **params)
        return [{**vectors, "embeddings": rows} for rows in _split(vectors["embeddings"], parts)]
    if task == "classify":
        labels = classify(engine, merged, **params, images=images)["labels"]
        return [{"labels": rows} for rows in _split(labels, parts)]
    return _split_outputs(forward(engine, merged)["outputs"], parts)


def _split(rows: list[Any], parts: list[list[Any]]) -> list[list[Any]]:
    out, start = [], 0
    for part in parts:
        out.append(rows[start:start + len(part)])
        start += len(part)
    return out


def _split_outputs(outputs: dict[str, dict[str, Any]], parts: list[list[Any]]) -> list[dict[str, Any]]:
    total = sum(len(p) for p in parts)
    for name, value in outputs.items():
        if not value["shape"] or value["shape"][0] != total:
            raise TaskError(f"output {name} is not per input row; it cannot be split")
    results = [{"outputs": {}} for _ in parts]
    for name, value in outputs.items():
        for result, rows in zip(results, _split(value["values"], parts)):
            result["outputs"][name] = {**value, "shape": [len(rows), *value["shape"][1:]], "values": rows}
    return results
