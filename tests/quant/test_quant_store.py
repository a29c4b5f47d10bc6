"""The stored representation: exact import from GGUF, sizes, metadata, safetensors round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf_support import TESTDATA as GGUF_DIR
from gguf_support import float_bits  # noqa: E402

from hermesd.errors import ConvertError  # noqa: E402
from hermesd.quant.qweight import (  # noqa: E402
    QuantizedWeight,
    QuantMeta,
    check_tensors,
    from_gguf,
    meta_key,
    metas_from_header,
    storage_ratio,
)

SIMPLE = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]


def _simple(qtype: str, n: int = 32, k: int = 256) -> tuple[np.ndarray, QuantizedWeight]:
    w = np.random.default_rng(1).standard_normal((n, k)).astype(np.float32)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])
    return raw, from_gguf(raw, qtype, (n, k))


def _kquants() -> dict[str, object]:
    """One tensor of each K-quant type from the shipped files (name -> ReaderTensor)."""
    out: dict[str, object] = {}
    for name in ("tiny-llama-Q4_K_M.gguf", "tiny-llama-Q5_K_M.gguf"):
        path = GGUF_DIR / name
        if path.exists():
            for t in gguf.GGUFReader(str(path)).tensors:
                out.setdefault(t.tensor_type.name, t)
    return {k: v for k, v in out.items() if k in ("Q4_K", "Q5_K", "Q6_K")}


KQ = _kquants()


@pytest.mark.parametrize("qtype", SIMPLE)
def test_simple_import_is_exact(qtype: str) -> None:
    raw, qw = _simple(qtype)
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
    assert np.array_equal(float_bits(qw.dequantize().numpy()), float_bits(expected))


@pytest.mark.skipif(len(KQ) < 3, reason="K-quant test files missing from ../shared/testdata/gguf")
@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_kquant_import_is_exact(qtype: str) -> None:
    t = KQ[qtype]
    n, k = int(t.shape[1]), int(t.shape[0])  # type: ignore[attr-defined]
    qw = from_gguf(t.data, t.tensor_type, (n, k))  # type: ignore[attr-defined]
    expected = gguf.quants.dequantize(t.data, t.tensor_type)  # type: ignore[attr-defined]
    assert np.array_equal(float_bits(qw.dequantize().numpy()), float_bits(expected))
    assert qw.meta.super_block == 256 and qw.super_scales is not None


@pytest.mark.parametrize("qtype", SIMPLE)
def test_storage_size_against_gguf(qtype: str) -> None:
    _, qw = _simple(qtype)
    # every format keeps as many bits a code as its GGUF blocks: 4-bit nibbles, 5-bit bit planes, 8-bit bytes
    assert storage_ratio(qw) <= 1.03


@pytest.mark.skipif(len(KQ) < 3, reason="K-quant test files missing")
def test_kquant_storage_ratio() -> None:
    ratios = {}
    for qtype, t in KQ.items():
        ratios[qtype] = storage_ratio(from_gguf(t.data, t.tensor_type, (int(t.shape[1]), int(t.shape[0]))))  # type: ignore[attr-defined]
    # the sub-scales and mins take a byte each where Q4_K/Q5_K pack them in 6 bits: 16 bytes for 12
    assert ratios["Q4_K"] < 1.03 and ratios["Q5_K"] < 1.03 and ratios["Q6_K"] <= 1.0


def test_meta_json_round_trip_and_header() -> None:
    _, qw = _simple("Q4_1")
    meta = qw.meta
    assert QuantMeta.from_json(meta.to_json()) == meta
    header = {meta_key("model.layers.0.mlp.up_proj"): meta.to_json(), "format": "pt"}
    assert metas_from_header(header) == {"model.layers.0.mlp.up_proj": meta}
    with pytest.raises(ConvertError, match="version"):
        QuantMeta.from_dict({**meta.to_dict(), "version": 99})
    with pytest.raises(ConvertError, match="unsupported"):
        QuantMeta.from_dict({**meta.to_dict(), "format": "Q2_K"})
    assert QuantMeta.from_dict({**meta.to_dict(), "packing": "halves64"}).packing == "halves64"


def test_packing_is_recorded_and_any_packing_dequantizes_the_same() -> None:
    raw, native = _simple("Q4_1")
    portable = from_gguf(raw, "Q4_1", (32, 256), packing="rowmajor")
    assert portable.meta.packing == "rowmajor"
    for packing in ("halves64", "halves32", "pairs16", "native"):
        other = portable.repacked(packing)
        assert QuantMeta.from_json(other.meta.to_json()) == other.meta
        assert torch.equal(other.dequantize(), portable.dequantize())
    assert torch.equal(native.dequantize(), portable.dequantize())
    with pytest.raises(ConvertError, match="packing"):
        QuantMeta.from_dict({**portable.meta.to_dict(), "packing": "zigzag8"})
    _, wide = _simple("Q8_0")
    assert wide.meta.packing == "rowmajor"  # only 4-bit codes have kernel layouts


def test_tensor_names_and_safetensors_round_trip(tmp_path: Path) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    _, qw = _simple("Q5_1")
    name = "model.layers.0.self_attn.q_proj"
    tensors = qw.tensors(name)
    assert sorted(tensors) == [f"{name}.qhigh", f"{name}.qweight", f"{name}.scales", f"{name}.zeros"]
    assert tensors[f"{name}.qhigh"].shape == (qw.meta.shape[0], qw.meta.shape[1] // 8)  # a bit a code
    path = tmp_path / "stage.safetensors"
    safetensors.save_file(tensors, str(path), metadata={meta_key(name): qw.meta.to_json()})
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metas = metas_from_header(f.metadata())
        loaded = {k: f.get_tensor(k) for k in f.keys()}
    back = QuantizedWeight.from_tensors(metas[name], loaded, name)
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_shape_and_dtype_checks() -> None:
    _, qw = _simple("Q4_0")
    bad = QuantizedWeight(qw.meta, qw.qweight[:, :-1], qw.scales)
    with pytest.raises(ConvertError, match="qweight"):
        check_tensors(bad)
    with pytest.raises(ConvertError, match="scales"):
        check_tensors(QuantizedWeight(qw.meta, qw.qweight, qw.scales.float()))
    with pytest.raises(ConvertError, match="missing"):
        QuantizedWeight.from_tensors(qw.meta, {"w.qweight": qw.qweight}, "w")
    with pytest.raises(ConvertError, match="bytes"):
        from_gguf(np.zeros(10, np.uint8), "Q4_0", (32, 256))


@pytest.mark.parametrize("bits", [5, 6])
def test_bit_planes_round_trip_every_code(bits: int) -> None:
    from hermesd.quant.bitplanes import pack_planes, unpack_planes

    codes = torch.arange(2 ** bits, dtype=torch.uint8).repeat(3, 8)  # every code, in every lane
    low, high = pack_planes(codes, bits)
    assert low.shape == (3, codes.shape[1] // 2) and high.shape == (3, codes.shape[1] * (bits - 4) // 8)
    assert torch.equal(unpack_planes(low, high, bits), codes)


@pytest.mark.parametrize("qtype", ["Q5_0", "Q5_1"])
def test_version_1_stores_with_a_byte_a_code_still_read(qtype: str) -> None:
    # stores written before the bit planes kept 5/6-bit codes one a byte (centred int8 when symmetric)
    _, planes = _simple(qtype)
    old_meta = QuantMeta.from_dict({**planes.meta.to_dict(), "packing": "rowmajor", "version": 1})
    old = QuantizedWeight(old_meta, planes.byte_codes(), planes.scales, planes.zeros)
    check_tensors(old)
    assert old.qweight.dtype == (torch.uint8 if planes.meta.affine else torch.int8)
    assert np.array_equal(float_bits(old.dequantize().numpy()), float_bits(planes.dequantize().numpy()))
    assert old.nbytes > 1.3 * planes.nbytes


def test_rows_built_block_by_block_equal_the_whole_weight() -> None:
    from hermesd.store.quantized import stored_meta, to_stored
    from hermesd.store.rowblocks import assemble_rows, part_meta, row_spans

    n, k = 1000, 1024  # 15 blocks of 64 rows and a 40-row tail
    w = np.random.default_rng(3).standard_normal((n, k)).astype(np.float32)
    for qtype in ("Q4_0", "Q5_1", "Q8_0"):
        raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])
        whole = from_gguf(raw, qtype, (n, k))
        meta = stored_meta(whole.meta)
        whole = to_stored(whole, meta)

        def rows(start: int, stop: int) -> QuantizedWeight:
            part = from_gguf(raw[start:stop], qtype, (stop - start, k), packing=meta.packing)
            return to_stored(part, part_meta(meta, start, stop))

        blocked = assemble_rows(meta, row_spans(n, k, 64 * k), rows)
        assert blocked.meta == whole.meta
        assert whole.tensors("w").keys() == blocked.tensors("w").keys()
        for name, tensor in whole.tensors("w").items():
            assert torch.equal(tensor, blocked.tensors("w")[name]), (qtype, name)
