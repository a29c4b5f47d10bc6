"""The layer store's manifest: what a store holds and how its stage files are laid out.

A store is a directory with ``manifest.json``, one safetensors file per stage under ``stages/`` and
the tokenizer/processor files copied from the source. The manifest is plain data (dataclasses
serialised to JSON) so that every other part of hermesd can reason about a model without torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hermesd.errors import StoreError

# 1: float stores. 2: adds ``StageEntry.quant`` (weights kept quantized); version 1 stores still read.
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"

# Bytes per element of the safetensors dtype names we write and read.
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a stage file: safetensors dtype, shape and byte range within the data section."""

    dtype: str
    shape: list[int]
    offsets: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]


@dataclass(frozen=True)
class TiedRef:
    """A tensor a stage uses but does not store: it lives in another stage's file (tied weights)."""

    stage: str
    tensor: str


@dataclass(frozen=True)
class StageEntry:
    """One stage: a module of the model whose weights live in one file and load as one unit.

    ``kind`` is ``block`` (an instance of a ``_no_split_modules`` class), ``rest`` (a module outside
    every block: embeddings, final norm, heads) or ``pinned`` (parameters owned directly by a module
    that contains blocks; they are few and always stay resident).
    ``gather`` names embedding tables read row by row for the tokens of a batch, never whole.
    ``quant`` maps local module paths (``""``: the stage's module) to the ``QuantMeta`` (as a dict)
    of modules whose weight is stored quantized: their tensors are ``<path>.qweight``,
    ``.scales`` and, by format, ``.zeros``/``.super_scales`` (stored here or tied).
    """

    name: str
    module: str
    kind: str
    file: str
    bytes: int
    data_start: int
    sha256: str
    tensors: dict[str, TensorEntry]
    tied: dict[str, TiedRef] = field(default_factory=dict)
    gather: list[str] = field(default_factory=list)
    quant: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def quant_formats(self) -> list[str]:
        """The quantized formats of this stage's modules (stored or tied), e.g. ``["Q4_K", "Q6_K"]``."""
        return sorted({str(meta.get("format")) for meta in self.quant.values()})

    @property
    def stored_bytes(self) -> int:
        """Bytes of tensor data in this stage's own file."""
        return sum(t.nbytes for t in self.tensors.values())


@dataclass
class Manifest:
    """Everything needed to rebuild and stream a model from a store directory."""

    architecture: str
    model_type: str
    dtype: str
    config: dict[str, Any]
    stages: list[StageEntry]
    files: list[str] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def stage(self, name: str) -> StageEntry:
        for entry in self.stages:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def tensor_of(self, ref: TiedRef) -> TensorEntry:
        return self.stage(ref.stage).tensors[ref.tensor]

    def weight_bytes(self) -> int:
        """Total bytes of weights in the store (tied tensors counted once)."""
        return sum(entry.stored_bytes for entry in self.stages)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def save(self, store_dir: Path) -> None:
        path = Path(store_dir) / MANIFEST_NAME
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(self.to_json())
            handle.flush()
            os.fsync(handle.fileno())

    @classmethod
    def load(cls, store_dir: str | os.PathLike[str]) -> "Manifest":
        """Read and validate ``manifest.json``; raise StoreError with a clear message otherwise."""
        path = Path(store_dir) / MANIFEST_NAME
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StoreError(f"{store_dir} is not a hermesd store: {MANIFEST_NAME} is missing") from None
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read {path}: {exc}") from None
        return cls.from_dict(raw, origin=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], origin: str = "manifest") -> "Manifest":
        version = raw.get("format_version") if isinstance(raw, dict) else None
        if not isinstance(version, int):
            raise StoreError(f"{origin}: no format_version; not a hermesd manifest")
        if version > FORMAT_VERSION:
            raise StoreError(
                f"{origin}: store format version {version} is newer than this hermesd reads "
                f"(up to {FORMAT_VERSION}); upgrade hermesd or convert the model again"
            )
        try:
            stages = [_stage_from_dict(s) for s in raw["stages"]]
            return cls(
                architecture=raw["architecture"], model_type=raw["model_type"], dtype=raw["dtype"],
                config=raw["config"], stages=stages, files=list(raw.get("files", [])),
                source=dict(raw.get("source", {})), format_version=version,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{origin}: malformed manifest ({type(exc).__name__}: {exc})") from None


def _stage_from_dict(raw: dict[str, Any]) -> StageEntry:
    tensors = {
        name: TensorEntry(dtype=t["dtype"], shape=list(t["shape"]), offsets=tuple(t["offsets"]))
        for name, t in raw["tensors"].items()
    }
    tied = {name: TiedRef(**ref) for name, ref in raw.get("tied", {}).items()}
    return StageEntry(
        name=raw["name"], module=raw["module"], kind=raw["kind"], file=raw["file"],
        bytes=int(raw["bytes"]), data_start=int(raw["data_start"]), sha256=raw["sha256"],
        tensors=tensors, tied=tied, gather=list(raw.get("gather", [])),
        quant={str(k): dict(v) for k, v in raw.get("quant", {}).items()},
    )
