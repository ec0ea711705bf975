"""Every way a diff can be broken is refused with a DiffError (an ArtefactError), and the
base model is left untouched."""

from __future__ import annotations

import struct
import zlib
from dataclasses import replace

import numpy as np
import pytest
import torch
import zstandard

from shared.artefacts import ArtefactError
from shared.codec import (
    BadIndicesError,
    BadMagicError,
    BadTableError,
    BadValuesError,
    ChecksumError,
    DiffError,
    LimitError,
    TargetHashError,
    TrailingDataError,
    TruncatedDiffError,
    UnknownEncodingError,
    UnsupportedVersionError,
    WrongBaseError,
    decode_diff,
    encode_update,
    make_update,
    read_header,
    size_breakdown,
)
from shared.codec.bitio import pack_bits, write_varint
from shared.codec.dtypes import BY_TORCH
from shared.codec.golomb import golomb_cost, golomb_encode
from shared.codec.sections import encode_int8_golomb
from shared.codec.wire import (
    C_NONE,
    C_SHUFFLE_ZSTD,
    C_ZSTD,
    I_BITMAP,
    I_GOLOMB,
    LAYOUT_DENSE,
    LAYOUT_SPARSE,
    MAGIC,
    V_FP16,
    V_INT8,
    V_INT8_GOLOMB,
    V_RAW,
    Entry,
    Section,
    write_entry,
)
from shared.models import ArchSpec, model_hash

# The codec hashes the architecture it is given (a diff keeps its base's); it does not build
# the model, so these tensors need not fit it.
ARCH = ArchSpec("mlp", (40,), 40, hidden=(48,))


def mhash(state) -> str:
    return model_hash(ARCH, state)


F32, I64, BOOL = BY_TORCH[torch.float32], BY_TORCH[torch.int64], BY_TORCH[torch.bool]


@pytest.fixture
def base() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(48, 40, generator=gen),
        "b.bias": torch.randn(40, generator=gen),
        "bn.num_batches_tracked": torch.tensor(3),
        "mask": torch.zeros(4, 8, dtype=torch.bool),
    }


def _target(base: dict) -> dict:
    gen = torch.Generator().manual_seed(1)
    t = {k: v.clone() for k, v in base.items()}
    t["a.weight"] = torch.where(
        torch.rand(48, 40, generator=gen) < 0.05, t["a.weight"] + 0.1, t["a.weight"]
    )
    t["b.bias"] = t["b.bias"] + 0.5  # dense change
    t["bn.num_batches_tracked"] = torch.tensor(4)
    return t


@pytest.fixture(params=["fp32", "int8"])
def diff(request, base) -> bytes:
    update = make_update(base, _target(base), request.param, arch=ARCH)
    return encode_update(update, mhash(base))


def _refused(
    data: bytes, base: dict, error: type[DiffError] = DiffError, match: str | None = None
) -> None:
    before = mhash(base)
    with pytest.raises(error, match=match):
        decode_diff(data, base, base_arch=ARCH)
    assert mhash(base) == before


def test_the_fixture_diff_has_every_section(diff, base):
    sizes = size_breakdown(diff)
    assert all(sizes[k] > 0 for k in ("header", "table", "indices", "values", "dense", "checksum"))
    assert issubclass(DiffError, ArtefactError)
    assert decode_diff(diff, base, base_arch=ARCH).model_hash == read_header(diff).target_hash


def test_every_flipped_byte_is_refused(diff, base):
    header_len = read_header(diff).header_bytes
    for pos in range(len(diff)):
        bad = bytearray(diff)
        bad[pos] ^= 0x5A
        error = ChecksumError if pos >= header_len or 6 <= pos < 70 else DiffError
        _refused(bytes(bad), base, error)


def test_every_truncation_is_refused(diff, base):
    for n in range(len(diff)):
        _refused(diff[:n], base, TruncatedDiffError if n >= 6 else DiffError)


def test_trailing_garbage_is_refused(diff, base):
    _refused(diff + b"\0", base, TrailingDataError)


def test_wrong_base_is_refused(diff, base):
    other = {k: v.clone() for k, v in base.items()}
    other["a.weight"][0, 0] += 1
    _refused(diff, other, WrongBaseError)
    _refused(diff, {k: v for k, v in base.items() if k != "mask"}, WrongBaseError)
    with pytest.raises(WrongBaseError):  # the same tensors as a model of another architecture
        decode_diff(diff, base, base_arch=ArchSpec("mlp", (1, 40), 40, hidden=(48,)))
    with pytest.raises(DiffError, match="needs the base"):
        decode_diff(diff, None, base_arch=ARCH)


def test_unknown_version_and_flags_are_refused(diff, base):
    _refused(diff[:4] + b"\x02" + diff[5:], base, UnsupportedVersionError, "version 2")
    _refused(diff[:5] + b"\x01" + diff[6:], base, UnsupportedVersionError, "flags")
    _refused(b"XXXX" + diff[4:], base, BadMagicError)


# ------------------------------------------------------------------ hand-built diffs
# Each case below carries a valid CRC, so it reaches the semantic checks behind it.


def _assemble(
    base: dict,
    entries: list[tuple[Entry, bytes]],
    target_hash: str = "0" * 64,
    extra_table: bytes = b"",
    extra_data: bytes = b"",
) -> bytes:
    table = b"".join(write_entry(e) for e, _ in entries) + extra_table
    data = b"".join(s for _, s in entries) + extra_data
    body = (
        MAGIC
        + bytes([1, 0])
        + bytes.fromhex(mhash(base))
        + bytes.fromhex(target_hash)
        + write_varint(len(entries))
        + write_varint(len(table))
        + write_varint(len(data))
        + table
        + data
    )
    return body + struct.pack("<I", zlib.crc32(body))


def _plain(raw: bytes) -> Section:
    return Section(C_NONE, len(raw), len(raw))


def _sparse_entry(
    positions: list[int],
    values: np.ndarray,
    name: str = "a.weight",
    shape=(48, 40),
    wd=F32,
    coding: int = V_RAW,
    **kw,
) -> tuple[Entry, bytes]:
    gaps = np.diff(np.asarray(positions), prepend=-1) - 1
    idx = pack_bits(golomb_encode(gaps, 4))
    vals = values.tobytes()
    e = Entry(
        name=name,
        wd=wd,
        shape=shape,
        layout=LAYOUT_SPARSE,
        nnz=len(positions),
        value_coding=coding,
        values=_plain(vals),
        index_coding=I_GOLOMB,
        index_m=4,
        index=_plain(idx),
        **kw,
    )
    return e, idx + vals


def _good(base: dict) -> tuple[Entry, bytes, str]:
    positions = [3, 17, 500]
    values = np.array([1.5, -2.0, 3.25], dtype="<f4")
    target = {k: v.clone() for k, v in base.items()}
    target["a.weight"].view(-1)[positions] = torch.from_numpy(values)
    e, stored = _sparse_entry(positions, values)
    return e, stored, mhash(target)


def test_hand_built_diff_decodes(base):
    """Positive control: the builder below makes valid diffs, so refusals are meaningful."""
    e, stored, target_hash = _good(base)
    assert decode_diff(_assemble(base, [(e, stored)], target_hash), base, base_arch=ARCH).model_hash == target_hash
    _refused(_assemble(base, [(e, stored)]), base, TargetHashError)


def test_unknown_encodings_are_refused(base):
    e, stored, _ = _good(base)
    for bad in (
        replace(e, value_coding=9),
        replace(e, index_coding=7),
        replace(e, layout=3),
        replace(e, values=replace(e.values, compression=5)),
        replace(e, wd=replace(F32, code=42)),
    ):
        _refused(_assemble(base, [(bad, stored)]), base, UnknownEncodingError)
    int_entry, int_stored = _sparse_entry(
        [0], np.array([1], "<f2"), name="bn.num_batches_tracked", shape=(), wd=I64, coding=V_FP16
    )
    _refused(_assemble(base, [(int_entry, int_stored)]), base, UnknownEncodingError, "float tensor")


def test_out_of_range_indices_are_refused(base):
    e, stored = _sparse_entry([5, 1919, 1920], np.zeros(3, "<f4"))  # 48 * 40 = 1920 elements
    _refused(_assemble(base, [(e, stored)]), base, BadIndicesError, "out of range")
    e, stored = _sparse_entry([4000], np.zeros(1, "<f4"))
    _refused(_assemble(base, [(e, stored)]), base, BadIndicesError)


def test_index_count_mismatches_and_stray_bits_are_refused(base):
    e, stored, _ = _good(base)
    idx_len = e.index.stored_len
    more = replace(e, nnz=40, values=_plain(bytes(160)))
    _refused(
        _assemble(base, [(more, stored[:idx_len] + bytes(160))]), base, TruncatedDiffError, "unary"
    )
    padded = replace(e, index=_plain(stored[:idx_len] + b"\x80"))
    _refused(
        _assemble(base, [(padded, stored[:idx_len] + b"\x80" + stored[idx_len:])]),
        base,
        TrailingDataError,
    )
    stray = bytearray(stored)
    stray[idx_len - 1] |= 0x01  # a one in the zero padding of the last index byte
    _refused(_assemble(base, [(e, bytes(stray))]), base, DiffError)
    bitmap = np.zeros(48 * 40, np.uint8)
    bitmap[[3, 17]] = 1
    raw = pack_bits(bitmap)
    bm = replace(e, index_coding=I_BITMAP, index_m=0, index=_plain(raw))
    _refused(_assemble(base, [(bm, raw + stored[idx_len:])]), base, BadIndicesError, "marks 2")


def test_table_inconsistencies_are_refused(base):
    e, stored, _ = _good(base)
    _refused(_assemble(base, [(e, stored), (e, stored)]), base, BadTableError, "duplicate")
    b_entry, b_stored = _sparse_entry([1], np.zeros(1, "<f4"), name="b.bias", shape=(40,))
    _refused(
        _assemble(base, [(b_entry, b_stored), (e, stored)]), base, BadTableError, "out of order"
    )
    _refused(
        _assemble(base, [(replace(e, shape=(40, 48)), stored)]), base, BadTableError, "base has"
    )
    _refused(_assemble(base, [(replace(e, name="ghost"), stored)]), base, BadTableError, "lacks")
    _refused(
        _assemble(base, [(replace(e, wd=BY_TORCH[torch.float64]), stored)]), base, BadTableError
    )
    _refused(_assemble(base, [(e, stored)], extra_table=b"\0"), base, TrailingDataError)
    _refused(_assemble(base, [(e, stored)], extra_data=b"\0"), base, TrailingDataError)


def test_sizes_out_of_bounds_are_refused(base):
    e, stored, _ = _good(base)
    _refused(_assemble(base, [(replace(e, nnz=48 * 40 + 1), stored)]), base, LimitError)
    _refused(
        _assemble(base, [(replace(e, shape=(2,) * 9), stored)]), base, LimitError, "dimensions"
    )
    _refused(_assemble(base, [(replace(e, shape=(1 << 20, 1 << 20)), stored)]), base, LimitError)
    huge = replace(e, values=Section(C_ZSTD, 12, 1 << 30))
    _refused(_assemble(base, [(huge, stored[: e.index.stored_len] + bytes(12))]), base, LimitError)
    frame = zstandard.ZstdCompressor().compress(bytes(8))  # declares 8 bytes, table says 12
    lying = replace(e, values=Section(C_ZSTD, len(frame), 12))
    _refused(
        _assemble(base, [(lying, stored[: e.index.stored_len] + frame)]),
        base,
        LimitError,
        "declares",
    )
    overlong = _assemble(base, [(e, stored)])
    n = overlong.index(write_varint(len(write_entry(e))), 70)
    body = (
        overlong[:70] + b"\x81\x00" + overlong[71:n] + overlong[n:-4]
    )  # tensor count 1 as 2 bytes
    _refused(body + struct.pack("<I", zlib.crc32(body)), base, DiffError, "overlong")


def test_bad_values_are_refused(base):
    e, stored, _ = _good(base)
    idx = stored[: e.index.stored_len]
    short = replace(e, values=_plain(bytes(8)))
    _refused(_assemble(base, [(short, idx + bytes(8))]), base, BadValuesError, "expected 12")
    q = np.array([1, -128, 3], np.int8)
    for scale, match in (
        (np.float32(0.1), "-128"),
        (np.float32(0), "scale"),
        (np.float32("nan"), "scale"),
    ):
        i8 = replace(e, value_coding=V_INT8, scale=scale, values=_plain(q.tobytes()))
        _refused(_assemble(base, [(i8, idx + q.tobytes())]), base, BadValuesError, match)
    q = np.array([0, 5, -5], np.int8)
    raw, qmin, m = encode_int8_golomb(q)
    bits = np.unpackbits(np.frombuffer(raw, np.uint8))
    bits[golomb_cost(np.abs(q.astype(np.int64)) - qmin, m)] = 1  # sign bit of the zero value: "-0"
    neg0 = pack_bits(bits)
    g = replace(
        e,
        value_coding=V_INT8_GOLOMB,
        scale=np.float32(0.1),
        qmin=qmin,
        value_m=m,
        values=_plain(neg0),
    )
    _refused(_assemble(base, [(g, idx + neg0)]), base, BadValuesError, "negative zero")
    flag = Entry(
        name="mask",
        wd=BOOL,
        shape=(4, 8),
        layout=LAYOUT_DENSE,
        nnz=32,
        value_coding=V_RAW,
        values=_plain(bytes([2]) + bytes(31)),
    )
    _refused(_assemble(base, [(flag, bytes([2]) + bytes(31))]), base, BadValuesError, "0 or 1")


def test_target_hash_is_checked_after_applying(diff, base):
    bad = bytearray(diff[:-4])
    bad[38] ^= 1  # first byte of the target hash
    _refused(bytes(bad) + struct.pack("<I", zlib.crc32(bad)), base, TargetHashError)


def test_shuffled_section_of_partial_values_is_refused(base):
    """A shuffle+zstd section whose raw length is not whole values raised numpy's bare
    ValueError from the unshuffle (issue 8, fault 4; found by tests/test_fuzz_install.py)."""
    e, stored, _ = _good(base)
    idx = stored[: e.index.stored_len]
    for raw in (bytes(11), bytes(1)):  # 3 fp32 values take 12 bytes
        frame = zstandard.ZstdCompressor().compress(raw)
        odd = replace(e, values=Section(C_SHUFFLE_ZSTD, len(frame), len(raw)))
        _refused(_assemble(base, [(odd, idx + frame)]), base, BadValuesError, "whole 4-byte")


def test_overflowing_int8_scale_is_refused_by_the_target_hash_without_a_warning(base):
    """scale * 127 overflows float32: inf is IEEE's answer and the target hash refuses it;
    numpy's overflow RuntimeWarning (an exception under -W error) no longer escapes."""
    import warnings

    e, stored, _ = _good(base)
    q = np.array([127, -127, 5], np.int8)
    i8 = replace(e, value_coding=V_INT8, scale=np.float32(3e38), values=_plain(q.tobytes()))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _refused(_assemble(base, [(i8, stored[: e.index.stored_len] + q.tobytes())]), base,
                 TargetHashError)
