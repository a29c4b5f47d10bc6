"""4-bit packing: row-major nibbles, and our conversion to torch's (ISA-dependent) kernel layout."""

from __future__ import annotations

import pytest
import torch

from hermesd.errors import ConvertError
from hermesd.quant.int4pack import (
    KernelLayout,
    _convert,
    _torch_convert,
    from_kernel_layout,
    int4_kernel_available,
    kernel_layout,
    pack_nibbles,
    to_kernel_layout,
    unpack_nibbles,
)

needs_kernel = pytest.mark.skipif(not int4_kernel_available(),
                                  reason="this torch build has no CPU int4 kernel (_convert_weight_to_int4pack_for_cpu)")
# N values with whole 64-row blocks, 32-row blocks and 16-row tails for every known BLOCK_N
SHAPES = [(16, 32), (48, 64), (208, 64), (96, 256), (272, 128)]


def _codes(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 16, (n, k), dtype=torch.int32, generator=torch.Generator().manual_seed(seed))


def test_rowmajor_nibbles_round_trip() -> None:
    codes = _codes(8, 6).to(torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (8, 3)
    assert int(packed[0, 0]) == int(codes[0, 0]) | int(codes[0, 1]) << 4  # low nibble = even k
    assert torch.equal(unpack_nibbles(packed), codes)
    assert torch.equal(unpack_nibbles(packed, out=torch.empty(8, 6, dtype=torch.float32)), codes.float())
    with pytest.raises(ConvertError, match="odd"):
        pack_nibbles(torch.zeros(2, 3, dtype=torch.uint8))


@needs_kernel
def test_layout_detected() -> None:
    layout = kernel_layout()
    assert layout is not None, "torch's int4 packing matches none of the known layouts"
    cap = torch.backends.cpu.get_cpu_capability()
    if cap == "AVX2":  # int4mm_kernel.cpp: BLOCK_N 32, rows d and d+16 share a byte
        assert layout == KernelLayout(32, "halves")
    elif cap.startswith("AVX512"):
        assert layout == KernelLayout(64, "halves")


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
def test_conversion_matches_torch(shape: tuple[int, int]) -> None:
    codes = _codes(*shape)
    expected = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    packed = pack_nibbles(codes)
    assert torch.equal(to_kernel_layout(packed), expected)
    assert torch.equal(_torch_convert(packed), expected)
    assert torch.equal(from_kernel_layout(expected), packed)


@needs_kernel
def test_in_place_conversion_both_ways() -> None:
    codes = _codes(272, 128, seed=3)
    packed = pack_nibbles(codes)
    buf = packed.clone()
    assert to_kernel_layout(buf, out=buf) is buf
    assert torch.equal(buf, torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
    from_kernel_layout(buf, out=buf)
    assert torch.equal(buf, packed)


@pytest.mark.parametrize("layout", [KernelLayout(64, "halves"), KernelLayout(32, "halves"), KernelLayout(16, "pairs")])
def test_every_known_layout_round_trips(layout: KernelLayout) -> None:
    """Layouts this CPU does not use (AVX-512's, NEON's) at least invert exactly."""
    packed = pack_nibbles(_codes(208, 64, seed=5))
    there = _convert(packed, layout, torch.empty_like(packed), True)
    assert not torch.equal(there, packed)
    assert torch.equal(_convert(there, layout, torch.empty_like(there), False), packed)


def test_avx512_layout_by_its_definition() -> None:
    """AVX-512 block of 64 rows: byte d of column k holds rows d (low nibble) and d + 32 (high)."""
    codes = _codes(64, 4, seed=7)
    out = _convert(pack_nibbles(codes), KernelLayout(64, "halves"), torch.empty(64, 2, dtype=torch.uint8), True)
    flat = out.reshape(4, 32)  # [k, 32 bytes]
    for k in range(4):
        for d in range(32):
            assert int(flat[k, d]) == int(codes[d, k]) | int(codes[d + 32, k]) << 4


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ConvertError, match="divisible by 16"):
        to_kernel_layout(torch.zeros(8, 16, dtype=torch.uint8))
    with pytest.raises(ConvertError, match="uint8"):
        to_kernel_layout(torch.zeros(16, 16, dtype=torch.int8))
