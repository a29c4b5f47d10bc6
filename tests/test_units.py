"""Byte-size parsing and formatting."""

import pytest

from hermesd.units import format_size, parse_size


@pytest.mark.parametrize("text, expected", [
    ("256MiB", 256 << 20), ("1.5G", 3 << 29), ("300MB", 300_000_000), ("42", 42), (" 2 kib ", 2048), (7, 7),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "12 parsecs", "-5MiB", "MiB", True, -1])
def test_parse_size_refuses_nonsense(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_format_size():
    assert [format_size(n) for n in (512, 1536, 5 << 20, 3 << 30)] == ["512 B", "1.5 KiB", "5.0 MiB", "3.0 GiB"]
