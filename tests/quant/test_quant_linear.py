"""QuantLinear against F.linear on the de-quantized weight, for every format, M=1/128, fp32/bf16.

Tolerances (relative L2 error against an fp64 product of the same inputs and de-quantized weight):

* de-quantize + fp32 ``F.linear`` (the ``dense`` path with fp32 inputs): 1e-5. The weight is exact
  and fp32 accumulation over K <= 768 terms errs ~1e-7 (measured <= 1.4e-7).
* every path that touches bf16 (bf16 inputs, or the integer kernels, which run in bf16 on x86 and
  take bf16 scale/zero): 1e-2. bf16 keeps 8 significant bits, so rounding the activations, the
  scale/zero table and the output each add up to ~2e-3 relative RMS (measured 1.6e-3 to 3.3e-3).
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

gguf = pytest.importorskip("gguf")

from gguf_support import TESTDATA as GGUF_DIR  # noqa: E402

from hermesd.quant.cpu import default_policy  # noqa: E402
from hermesd.quant.int4pack import int4_kernel_available, native_tag  # noqa: E402
from hermesd.quant.kernels import int8_kernel_available  # noqa: E402
from hermesd.quant.linear import QuantLinear, quantize_linear  # noqa: E402
from hermesd.quant.quantizer import quantize  # noqa: E402
from hermesd.quant.qweight import QuantizedWeight, from_gguf  # noqa: E402

KQUANT_SOURCES = {"Q4_K": ("tiny-llama-Q4_K_M.gguf", "blk.0.ffn_up.weight"),
                  "Q5_K": ("tiny-llama-Q5_K_M.gguf", "blk.0.ffn_up.weight"),
                  "Q6_K": ("tiny-llama-Q4_K_M.gguf", "blk.2.ffn_down.weight")}
FORMATS = ["int8", "int4", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
SMALL_M_PATH = {"int8": "int8", "int4": "int4", "Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4",
                "Q5_0": "int4x2", "Q5_1": "int4x2", "Q5_K": "int4x2", "Q8_0": "int4x2", "Q6_K": "dense"}
INT4X2 = dataclasses.replace(default_policy(), use_int4x2=True)  # opt-in (resident stages)
N, K = 96, 512  # 96 rows: whole 32-row kernel blocks and, with 64-row blocks, a 32-row tail


def _kquant(fmt: str) -> QuantizedWeight:
    name, tensor = KQUANT_SOURCES[fmt]
    path = GGUF_DIR / name
    if not path.exists():
        pytest.skip(f"{path} missing")
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == tensor)
    return from_gguf(t.data, t.tensor_type, (int(t.shape[1]), int(t.shape[0])))


@functools.lru_cache(maxsize=None)
def make_weight(fmt: str) -> QuantizedWeight:
    """A weight of ``fmt``: ours and the simple GGML types from random floats, K-quants from llama.cpp files."""
    if fmt in KQUANT_SOURCES:
        return _kquant(fmt)
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(0)) * 0.02
    if fmt in ("int8", "int4"):
        return quantize(w, fmt)
    raw = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[fmt])
    return from_gguf(raw, fmt, (N, K))


def _module(qw: QuantizedWeight, bias: bool = True, policy=None) -> QuantLinear:
    b = torch.randn(qw.meta.shape[0], generator=torch.Generator().manual_seed(1)) if bias else None
    return QuantLinear.from_quantized(qw, b, policy=policy)


def _input(m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    shape = (m, k) if m == 1 else (2, m // 2, k)  # leading dims are kept
    return torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)


def _rel_err(y: torch.Tensor, x: torch.Tensor, mod: QuantLinear) -> float:
    w = mod.dequantize().double()
    b = None if mod.bias is None else mod.bias.double()
    ref = F.linear(x.double(), w, b)
    return float((y.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m", [1, 128])
@pytest.mark.parametrize("fmt", FORMATS + ["Q5_0+int4x2", "Q5_1+int4x2", "Q5_K+int4x2", "Q8_0+int4x2"])
def test_matches_linear_on_dequantized_weight(fmt: str, m: int, dtype: torch.dtype) -> None:
    fmt, _, opt = fmt.partition("+")
    mod = _module(make_weight(fmt), policy=INT4X2 if opt else None)
    x = _input(m, mod.in_features, dtype)
    y = mod(x)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], mod.out_features)
    path = mod.prepare() if m <= mod.max_kernel_rows() else "dense"
    exact = path == "dense" and dtype == torch.float32 and mod.policy.dense_dtype == torch.float32
    assert _rel_err(y, x, mod) < (1e-5 if exact else 1e-2), path


@pytest.mark.parametrize("fmt", FORMATS)
def test_small_m_takes_the_integer_kernel(fmt: str) -> None:
    expected = SMALL_M_PATH[fmt]
    if expected == "int8" and not int8_kernel_available():
        pytest.skip("torch._weight_int8pack_mm is missing from this torch build")
    if expected.startswith("int4") and not int4_kernel_available():
        pytest.skip("aten._weight_int4pack_mm_for_cpu is missing from this torch build")
    assert _module(make_weight(fmt), policy=INT4X2).prepare() == expected
    if expected == "int4x2":  # off by default: its re-packing costs ~8 ms/MB at every load
        assert _module(make_weight(fmt)).prepare() == "dense"


@pytest.mark.parametrize("fmt", ["int8", "Q4_K", "Q8_0", "Q6_K"])
def test_state_dict_round_trip(fmt: str) -> None:
    """Tensors out (state dict) -> a meta-device skeleton -> tensors in: the same outputs, bit for bit."""
    mod = _module(make_weight(fmt))
    state = mod.state_dict()
    assert set(state) == {k.split(".", 1)[1] for k in mod.quantized().tensors("w")} | {"bias"}
    skeleton = QuantLinear(mod.qmeta, bias=True, device="meta")
    skeleton.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    for m in (1, 128):
        x = _input(m, mod.in_features, torch.float32)
        assert torch.equal(skeleton(x), mod(x))


def _frombuffer_views(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """Bind each stored tensor as a view of a private writable buffer, as the engine does."""
    out = {}
    for name, t in qw.tensors("").items():
        buf = bytearray(t.contiguous().view(torch.uint8).numpy().tobytes())
        out[name[1:]] = torch.frombuffer(buf, dtype=t.dtype).view(t.shape)
    return out


needs_int4 = pytest.mark.skipif(not int4_kernel_available(), reason="no CPU int4 kernel in this torch build")


@needs_int4
@pytest.mark.parametrize("fmt", ["int4", "Q4_K"])
def test_in_place_prepare_and_rebind(fmt: str) -> None:
    qw = make_weight(fmt).repacked("rowmajor")  # a portable store: prepare must convert it
    reference = _module(qw, bias=False)
    x1, x128 = _input(1, qw.meta.shape[1], torch.bfloat16), _input(128, qw.meta.shape[1], torch.float32)
    mod = QuantLinear(qw.meta, device="meta")
    mod.load_state_dict(_frombuffer_views(qw), assign=True)
    assert mod.prepare(inplace=True) == "int4"
    assert not torch.equal(mod.qweight, qw.qweight)  # the bound bytes are in the kernel layout now
    assert mod.quantized().meta.packing == native_tag()
    assert torch.equal(mod(x1), reference(x1))
    assert torch.equal(mod(x128), reference(x128))  # the dense path reads the kernel layout back
    assert torch.equal(mod.dequantize(), qw.dequantize())
    mod.load_state_dict(_frombuffer_views(qw), assign=True)  # a new load of the stage: row-major again
    assert mod.quantized().meta.packing == "rowmajor"
    assert torch.equal(mod(x1), reference(x1))


@needs_int4
def test_native_packing_binds_without_conversion() -> None:
    if native_tag() == "rowmajor":
        pytest.skip("torch's int4 packing on this CPU matches none of the layouts we reproduce")
    qw = make_weight("Q4_K")
    assert qw.meta.packing == native_tag()
    mod = QuantLinear(qw.meta, device="meta")
    mod.load_state_dict(_frombuffer_views(qw), assign=True)
    mod.prepare()
    assert mod._prepared is not None and mod._prepared.packed.data_ptr() == mod.qweight.data_ptr()


@needs_int4
@pytest.mark.parametrize("packing", ["rowmajor", "halves64", "halves32", "pairs16"])
def test_store_made_on_another_cpu(packing: str) -> None:
    """A store packed for another ISA gives the same outputs after the loader re-packs it."""
    qw = make_weight("int4")
    reference = _module(qw, bias=False)
    other = _module(qw.repacked(packing), bias=False)
    for m in (1, 128):
        x = _input(m, K, torch.float32)
        assert torch.equal(other(x), reference(x))


def test_inference_mode_and_no_bias() -> None:
    with torch.inference_mode():
        mod = _module(make_weight("int4"), bias=False)
        x = _input(1, K, torch.float32)
        assert _rel_err(mod(x), x, mod) < 1e-2


def test_kernel_threshold_is_a_policy() -> None:
    mod = _module(make_weight("Q4_0"))
    x = _input(4, K, torch.float32)
    dense = dataclasses.replace(default_policy(), kernel_max_m=0)
    mod_dense = QuantLinear.from_quantized(mod.quantized(), mod.bias, policy=dense)
    assert _rel_err(mod_dense(x), x, mod_dense) < 1e-5
    with pytest.raises(ValueError, match="last dim"):
        mod(torch.randn(1, K + 1))


def test_quantize_linear() -> None:
    lin = nn.Linear(K, N)
    mod = quantize_linear(lin, "int8")
    x = torch.randn(3, K)
    with torch.no_grad():
        ref = lin(x)
        assert float((mod(x) - ref).norm() / ref.norm()) < 0.02  # int8 weight error dominates
    assert mod.out_features == N and mod.in_features == K and mod.bias is not None
