"""Quantized weights: GGML block formats, the stored representation and CPU compute kernels.

* :mod:`.ggml_blocks`: byte layout of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K and vectorised
  decoders to codes + group factors (bit-exact with ggml).
* :mod:`.qweight`: how a quantized Linear weight is stored (``<name>.qweight/.scales/.zeros/
  .super_scales`` + :class:`QuantMeta`), built from GGUF blocks (:func:`from_gguf`).
* :mod:`.quantizer`: our ``int8`` / ``int4`` quantizer for float weights.
* :mod:`.int4pack`: 4-bit packings, torch's ISA-dependent int4 kernel layout, :func:`repack`.
* :mod:`.linear`: :class:`QuantLinear`, the ``nn.Linear`` replacement; :mod:`.kernels` its paths.
"""

from hermesd.quant.cpu import KernelPolicy, default_policy
from hermesd.quant.dequant import dequantize
from hermesd.quant.ggml_blocks import BLOCK_FORMATS, BlockFormat, decode_blocks, decode_float, row_bytes
from hermesd.quant.int4pack import ROWMAJOR, native_tag, repack
from hermesd.quant.linear import QuantLinear, quantize_linear
from hermesd.quant.quantizer import quantize
from hermesd.quant.qweight import QuantizedWeight, QuantMeta, from_gguf, meta_key, metas_from_header

__all__ = [
    "BLOCK_FORMATS", "ROWMAJOR", "BlockFormat", "KernelPolicy", "QuantLinear", "QuantMeta", "QuantizedWeight",
    "decode_blocks", "decode_float", "default_policy", "dequantize", "from_gguf", "meta_key",
    "metas_from_header", "native_tag", "quantize", "quantize_linear", "repack", "row_bytes",
]
