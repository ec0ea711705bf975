"""Wire format v1 of ``diff/sparse-v1``: constants, the fixed header and the tensor table.

The full byte layout is specified in docs/diff-format.md; this module is its executable form.
Parsing here checks only what the bytes alone can tell (format limits, known codes);
:mod:`shared.codec.decode` checks the table against the base model.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from shared.codec.bitio import ByteReader, write_varint
from shared.codec.dtypes import BY_CODE, WireDType
from shared.codec.errors import (
    BadMagicError,
    LimitError,
    UnknownEncodingError,
    UnsupportedVersionError,
)

DIFF_ENCODING = "diff/sparse-v1"
MAGIC = b"ELDF"
VERSION = 1
HASH_BYTES = 32
FIXED_HEADER_BYTES = 4 + 1 + 1 + 2 * HASH_BYTES  # magic, version, flags, two SHA-256 digests
CHECKSUM_BYTES = 4

# Format limits: a decoder refuses anything larger before allocating for it.
MAX_TENSORS = 1 << 20
MAX_NAME_BYTES = 1024
MAX_NDIM = 8
MAX_ELEMENTS = 1 << 31  # per tensor; keeps every position sum inside int64
MAX_SECTION_BYTES = 1 << 31
MAX_GOLOMB_PARAMETER = 1 << 31

LAYOUT_SPARSE, LAYOUT_DENSE = 0, 1
LAYOUTS = {LAYOUT_SPARSE: "sparse", LAYOUT_DENSE: "dense"}
# value codings
V_RAW, V_FP16, V_INT8, V_INT8_GOLOMB, V_ALQ = 0, 1, 2, 3, 4
VALUE_CODINGS = {V_RAW: "raw", V_FP16: "fp16", V_INT8: "int8", V_INT8_GOLOMB: "int8-golomb",
                 V_ALQ: "alq"}  # fmt: skip
MAX_ALQ_GROUP = 65535
# index codings
I_GOLOMB, I_GOLOMB_COMPLEMENT, I_BITMAP = 0, 1, 2
INDEX_CODINGS = {I_GOLOMB: "golomb", I_GOLOMB_COMPLEMENT: "golomb-complement", I_BITMAP: "bitmap"}
# section compressions
C_NONE, C_ZSTD, C_SHUFFLE_ZSTD = 0, 1, 2
COMPRESSIONS = {C_NONE: "none", C_ZSTD: "zstd", C_SHUFFLE_ZSTD: "shuffle+zstd"}


@dataclass(frozen=True)
class Section:
    """Where a section's bytes are and how to turn them into its raw bytes."""

    compression: int
    stored_len: int
    raw_len: int  # equals stored_len when uncompressed
    offset: int = -1  # absolute offset of the stored bytes (set by the parser)


@dataclass(frozen=True)
class Entry:
    """One tensor-table entry (see docs/diff-format.md, "Tensor table")."""

    name: str
    wd: WireDType
    shape: tuple[int, ...]
    layout: int
    nnz: int  # values carried: positions for sparse, numel for dense
    value_coding: int
    values: Section
    scale: np.float32 | None = None  # int8 codings
    qmin: int = 0  # int8-golomb: smallest magnitude
    value_m: int = 0  # int8-golomb: Golomb parameter of the magnitudes
    index_coding: int | None = None  # sparse only
    index_m: int = 0  # Golomb parameter of the gaps
    index: Section | None = None
    alq_group: int = 0  # alq: values per group

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def pack_header(
    base_hash: str, target_hash: str, n_tensors: int, table_len: int, data_len: int
) -> bytes:
    return (
        MAGIC
        + bytes([VERSION, 0])
        + bytes.fromhex(base_hash)
        + bytes.fromhex(target_hash)
        + write_varint(n_tensors)
        + write_varint(table_len)
        + write_varint(data_len)
    )


@dataclass(frozen=True)
class RawHeader:
    version: int
    base_hash: str
    target_hash: str
    n_tensors: int
    table_len: int
    data_len: int
    header_len: int


def parse_header(data: bytes) -> RawHeader:
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise BadMagicError(f"not a {DIFF_ENCODING} artefact: bad magic {bytes(data[:4])!r}")
    r = ByteReader(data, len(MAGIC), len(data), "diff header")
    version, flags = r.u8("version"), r.u8("flags")
    if version != VERSION:
        raise UnsupportedVersionError(
            f"diff format version {version} is not supported (this decoder reads {VERSION})"
        )
    if flags != 0:
        raise UnsupportedVersionError(
            f"diff header flags {flags:#04x} are not supported (v1 requires 0)"
        )
    base = bytes(r.take(HASH_BYTES, "base hash")).hex()
    target = bytes(r.take(HASH_BYTES, "target hash")).hex()
    n = r.varint("tensor count", MAX_TENSORS)
    table_len = r.varint("table length", MAX_SECTION_BYTES)
    data_len = r.varint("data length", 1 << 62)
    return RawHeader(version, base, target, n, table_len, data_len, r.pos)


def _write_section(out: bytearray, s: Section) -> None:
    out.append(s.compression)
    out += write_varint(s.stored_len)
    if s.compression != C_NONE:
        out += write_varint(s.raw_len)


def write_entry(e: Entry) -> bytes:
    name = e.name.encode("utf-8")
    out = bytearray(write_varint(len(name)) + name)
    out += bytes([e.wd.code, len(e.shape)])
    for d in e.shape:
        out += write_varint(d)
    out.append(e.layout)
    if e.layout == LAYOUT_SPARSE:
        if e.index_coding is None or e.index is None:
            raise ValueError(f"tensor {e.name!r}: a sparse entry needs an index coding and section")
        out += write_varint(e.nnz)
        out.append(e.index_coding)
        if e.index_coding in (I_GOLOMB, I_GOLOMB_COMPLEMENT):
            out += write_varint(e.index_m)
        _write_section(out, e.index)
    out.append(e.value_coding)
    if e.value_coding in (V_INT8, V_INT8_GOLOMB):
        if e.scale is None:
            raise ValueError(f"tensor {e.name!r}: int8 values need a scale")
        out += struct.pack("<f", float(e.scale))
    if e.value_coding == V_INT8_GOLOMB:
        out.append(e.qmin)
        out += write_varint(e.value_m)
    if e.value_coding == V_ALQ:
        if not 1 <= e.alq_group <= MAX_ALQ_GROUP:
            raise ValueError(f"tensor {e.name!r}: alq group size {e.alq_group} out of range")
        out += write_varint(e.alq_group)
    _write_section(out, e.values)
    return bytes(out)


def _read_section(r: ByteReader, field: str) -> Section:
    comp = r.u8(f"{field} compression")
    if comp not in COMPRESSIONS:
        raise UnknownEncodingError(f"{r.what}: unknown {field} compression {comp}")
    stored = r.varint(f"{field} length", MAX_SECTION_BYTES)
    raw = r.varint(f"{field} raw length", MAX_SECTION_BYTES) if comp != C_NONE else stored
    return Section(comp, stored, raw)


def _golomb_parameter(r: ByteReader, field: str) -> int:
    m = r.varint(field, MAX_GOLOMB_PARAMETER)
    if m < 1:
        raise LimitError(f"{r.what}: {field} must be at least 1")
    return m


def read_entry(r: ByteReader) -> Entry:
    """Parse one table entry (format limits and known codes only)."""
    n = r.varint("name length", MAX_NAME_BYTES)
    try:
        name = bytes(r.take(n, "name")).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnknownEncodingError(f"{r.what}: tensor name is not UTF-8: {exc}") from exc
    r.what = f"tensor table entry {name!r}"
    code = r.u8("dtype")
    if code not in BY_CODE:
        raise UnknownEncodingError(f"{r.what}: unknown dtype code {code}")
    ndim = r.u8("ndim")
    if ndim > MAX_NDIM:
        raise LimitError(f"{r.what}: {ndim} dimensions exceed the limit {MAX_NDIM}")
    shape = tuple(r.varint("dimension", MAX_ELEMENTS) for _ in range(ndim))
    numel = int(np.prod(shape, dtype=object)) if shape else 1
    if numel > MAX_ELEMENTS:
        raise LimitError(f"{r.what}: {numel} elements exceed the limit {MAX_ELEMENTS}")
    layout = r.u8("layout")
    if layout not in LAYOUTS:
        raise UnknownEncodingError(f"{r.what}: unknown layout {layout}")
    nnz, index_coding, index_m, index = numel, None, 0, None
    if layout == LAYOUT_SPARSE:
        nnz = r.varint("value count", numel)
        index_coding = r.u8("index coding")
        if index_coding not in INDEX_CODINGS:
            raise UnknownEncodingError(f"{r.what}: unknown index coding {index_coding}")
        if index_coding in (I_GOLOMB, I_GOLOMB_COMPLEMENT):
            index_m = _golomb_parameter(r, "index Golomb parameter")
        index = _read_section(r, "index section")
    vc = r.u8("value coding")
    if vc not in VALUE_CODINGS:
        raise UnknownEncodingError(f"{r.what}: unknown value coding {vc}")
    scale, qmin, value_m = None, 0, 0
    if vc in (V_INT8, V_INT8_GOLOMB):
        scale = r.f32("scale")
    if vc == V_INT8_GOLOMB:
        qmin = r.u8("smallest magnitude")
        value_m = _golomb_parameter(r, "value Golomb parameter")
    alq_group = 0
    if vc == V_ALQ:
        alq_group = r.varint("alq group size", MAX_ALQ_GROUP)
        if alq_group < 1:
            raise LimitError(f"{r.what}: alq group size must be at least 1")
    values = _read_section(r, "value section")
    return Entry(
        name,
        BY_CODE[code],
        shape,
        layout,
        nnz,
        vc,
        values,
        scale,
        qmin,
        value_m,
        index_coding,
        index_m,
        index,
        alq_group,
    )
