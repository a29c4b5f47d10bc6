"""A GGUF file as a convert source that keeps its quantization (the default for ``.gguf``).

The file is read through ``hermesd.quant.gguf_file``: one parameter at a time from the memory map,
under transformers' names, blocks untouched. Each quantized weight of a plain ``nn.Linear`` or
``nn.Embedding`` becomes the stored tensors of a ``QuantizedWeight`` (ggml's values exactly; see
``hermesd.quant.qweight``); every other tensor (norms, biases, F32/F16 weights, and quantized
weights of modules we cannot swap) is stored as floats, those last de-quantized one tensor at a time.
Each quantized weight is decoded a block of rows at a time (``hermesd.store.rowblocks``), so peak
memory is the stage being written plus a few MiB of decoded blocks, not the model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize
from torch import nn

from hermesd.errors import ConvertError
from hermesd.quant.ggml_blocks import BLOCK_FORMATS
from hermesd.quant.gguf_file import open_gguf
from hermesd.quant.int4pack import ROWMAJOR
from hermesd.quant.qweight import QuantizedWeight, QuantMeta, from_gguf, gguf_meta
from hermesd.store.quantized import EMBEDDING, is_quant_part, replaceable, stored_meta, to_stored, weight_groups
from hermesd.store.rowblocks import assemble_rows, part_meta, row_spans
from hermesd.store.stages import StageSpec

_FLOATS = {"F32": np.float32, "F16": np.float16}
DECODE_BLOCK_BYTES = 4 << 20  # decoded codes (a byte each) per block of rows: bounds the temporaries


class GGUFQuantSource:
    """A ``.gguf`` model whose quantized Linear/Embedding weights are stored quantized."""

    def __init__(self, path: Path, packing: str = "native") -> None:
        path = Path(path)
        # 4-bit codes of Linear weights: this CPU's int4 kernel layout by default, so decode binds them
        # as read (no copy per load); tables read by row are always row-major
        self.packing = packing
        if not path.is_file():
            raise ConvertError(f"{path}: no such GGUF file")
        # dequantize=True: the few tensors whose transformers form needs values (a transpose) become F32.
        self.file = open_gguf(path, dequantize=True)
        if self.file.missing:
            raise ConvertError(f"{path}: the file provides no tensor for {', '.join(self.file.missing[:4])}")
        self.config = self.file.config
        self.architecture = self.file.architecture
        self.config.architectures = [self.architecture]
        self.default_dtype = torch.float32
        self._plans = {plan.hf_name: plan for plan in self.file.plans()}
        self.metas: dict[str, QuantMeta] = {}
        self._current: tuple[str, QuantizedWeight] | None = None
        self.description = {"kind": "gguf", "path": str(path), "quantized": True,
                            "dequantized": list(self.file.dequantized)}

    def quant_modules(self, model: nn.Module) -> dict[str, QuantMeta]:
        """Full module path -> meta of each module whose weight stays quantized (tied modules included).

        A weight shared by several modules stays quantized only if every one of them can be swapped.
        """
        metas = {}
        for paths in weight_groups(model):
            plan = next((self._plans[f"{p}.weight"] for p in paths if f"{p}.weight" in self._plans), None)
            if plan is None or plan.ggml_type not in BLOCK_FORMATS or len(plan.shape) != 2:
                continue
            modules = [model.get_submodule(p) for p in paths]
            kinds = [replaceable(m) if tuple(m.weight.shape) == plan.shape else None for m in modules]
            if all(kinds):
                meta = gguf_meta(plan.ggml_type, plan.shape, ROWMAJOR if EMBEDDING in kinds else self.packing)
                meta = meta if EMBEDDING in kinds else stored_meta(meta)
                metas.update({p: meta for p in paths})
        self.metas = metas
        return metas

    def stage_tensors(self, model: nn.Module, stage: StageSpec, index: int) -> dict[str, torch.Tensor]:
        result = {}
        for local in stage.owned:
            full = f"{stage.module}.{local}" if stage.module else local
            if is_quant_part(full, self.metas):
                module, _, suffix = full.rpartition(".")
                result[local] = getattr(self._quantized(module), suffix)
            else:
                result[local] = self._floats(full, stage.name)
        self._current = None
        return result

    def _quantized(self, module: str) -> QuantizedWeight:
        """The stored form of ``module``'s weight; kept while its parts are asked for one by one."""
        if self._current is None or self._current[0] != module:
            name = f"{module}.weight"
            record = self.file.tensor(name)
            meta, k = self.metas[module], record.shape[1]

            def rows(start: int, stop: int) -> QuantizedWeight:
                part = from_gguf(record.raw[start:stop], record.ggml_type, (stop - start, k), packing=meta.packing)
                self.file.release_rows(name, start, stop)
                return to_stored(part, part_meta(meta, start, stop))

            qw = assemble_rows(meta, row_spans(record.shape[0], k, DECODE_BLOCK_BYTES), rows)
            self.file.release(name)
            self._current = (module, qw)
        return self._current[1]

    def _floats(self, full: str, stage: str) -> torch.Tensor:
        if full not in self._plans:
            raise ConvertError(f"{self.file.path}: no tensor for {full} (stage {stage})")
        record = self.file.tensor(full)
        if record.ggml_type in _FLOATS:
            values = np.array(record.raw.view(_FLOATS[record.ggml_type])).reshape(record.shape)
            tensor = torch.from_numpy(values)
        elif record.ggml_type == "BF16":
            tensor = torch.from_numpy(np.array(record.raw.view(np.int16))).view(torch.bfloat16).reshape(record.shape)
        else:  # a quantized weight of a module that stays float: de-quantize this tensor alone
            values = dequantize(record.raw, GGMLQuantizationType[record.ggml_type])
            tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(record.shape)
            self.description["dequantized"].append(f"{full} ({record.ggml_type})")
        self.file.release(full)
        return tensor

    def copy_side_files(self, dest: Path) -> list[str]:
        return self.file.save_tokenizer(dest)
