"""Read, check and apply ``diff/sparse-v1`` artefacts.

Order of checks: magic, version, lengths (truncation / trailing bytes), CRC-32, table
(format limits, then against the base), base hash, sections, and finally the model hash of
the result. Nothing is applied in place: a refused diff leaves the base untouched.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from shared.artefacts import MAX_ARTEFACT_BYTES, DecodedArtefact
from shared.codec.arith import ALQ, FP16, INT8, RAW
from shared.codec.bitio import ByteReader
from shared.codec.errors import (
    BadTableError,
    ChecksumError,
    DiffError,
    LimitError,
    TargetHashError,
    TrailingDataError,
    TruncatedDiffError,
    WrongBaseError,
)
from shared.codec.sections import (
    decode_index,
    decode_values,
    decompress,
    max_raw_len,
    value_elem_size,
)
from shared.codec.update import TensorDelta, apply_deltas
from shared.codec.wire import (
    CHECKSUM_BYTES,
    DIFF_ENCODING,
    INDEX_CODINGS,
    LAYOUT_SPARSE,
    LAYOUTS,
    MAGIC,
    V_ALQ,
    V_FP16,
    V_RAW,
    VALUE_CODINGS,
    Entry,
    RawHeader,
    Section,
    parse_header,
    read_entry,
)
from shared.models.identity import model_hash
from shared.models.spec import ArchSpec
from shared.tensors import StateDict


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # shared.tensors.DTYPE_NAMES spelling
    shape: tuple[int, ...]
    layout: str  # "sparse" | "dense"
    value_coding: str  # "raw" | "fp16" | "int8" | "int8-golomb" | "alq"
    index_coding: str | None  # "golomb" | "golomb-complement" | "bitmap" | None (dense)
    nnz: int  # values carried


@dataclass(frozen=True)
class DiffHeader:
    """What a diff says about itself, read without the base model (CRC checked)."""

    version: int
    base_hash: str
    target_hash: str
    tensors: tuple[TensorInfo, ...]  # changed tensors only
    header_bytes: int
    table_bytes: int
    data_bytes: int
    total_bytes: int

    @property
    def num_tensors(self) -> int:
        return len(self.tensors)


def sniff_diff(data: bytes) -> bool:
    return bytes(data[: len(MAGIC)]) == MAGIC


def _with_offset(sec: Section, offset: int) -> Section:
    return replace(sec, offset=offset)


def _parse(data: bytes) -> tuple[RawHeader, list[Entry]]:
    if len(data) > MAX_ARTEFACT_BYTES:
        raise LimitError(f"diff of {len(data)} bytes exceeds the {MAX_ARTEFACT_BYTES} limit")
    h = parse_header(data)
    data_start = h.header_len + h.table_len
    end = data_start + h.data_len
    if len(data) < end + CHECKSUM_BYTES:
        raise TruncatedDiffError(
            f"diff truncated: header promises {end + CHECKSUM_BYTES} bytes, got {len(data)}"
        )
    if len(data) > end + CHECKSUM_BYTES:
        raise TrailingDataError(
            f"{len(data) - end - CHECKSUM_BYTES} bytes of trailing garbage after the diff"
        )
    stored_crc = int.from_bytes(data[end:], "little")
    if zlib.crc32(memoryview(data)[:end]) & 0xFFFFFFFF != stored_crc:
        raise ChecksumError("diff checksum mismatch: the bytes are corrupted")
    r = ByteReader(data, h.header_len, data_start, "tensor table")
    entries: list[Entry] = []
    offset, prev = data_start, b""
    for i in range(h.n_tensors):
        r.what = f"tensor table entry {i}"
        e = read_entry(r)
        key = e.name.encode("utf-8")
        if entries and key <= prev:
            raise BadTableError(
                f"tensor table: {e.name!r} is a duplicate or out of order after {prev.decode()!r}"
            )
        prev = key
        if e.index is not None:
            index = _with_offset(e.index, offset)
            e = replace(e, index=index)
            offset += index.stored_len
            if index.raw_len > max_raw_len(e, index=True):
                raise LimitError(
                    f"{r.what}: index section of {index.raw_len} bytes is out of bounds"
                )
        e = replace(e, values=_with_offset(e.values, offset))
        offset += e.values.stored_len
        if e.values.raw_len > max_raw_len(e, index=False):
            raise LimitError(
                f"{r.what}: value section of {e.values.raw_len} bytes is out of bounds"
            )
        entries.append(e)
    if r.remaining():
        raise TrailingDataError(
            f"tensor table has {r.remaining()} bytes after its {h.n_tensors} entries"
        )
    if offset != end:
        raise (TruncatedDiffError if offset > end else TrailingDataError)(
            f"sections add up to {offset - data_start} bytes, header says {h.data_len}"
        )
    return h, entries


def read_header(data: bytes) -> DiffHeader:
    """Hashes, sizes and the tensor table of a diff, without needing its base."""
    h, entries = _parse(data)
    infos = tuple(
        TensorInfo(
            e.name,
            e.wd.name,
            e.shape,
            LAYOUTS[e.layout],
            VALUE_CODINGS[e.value_coding],
            INDEX_CODINGS[e.index_coding] if e.index_coding is not None else None,
            e.nnz,
        )
        for e in entries
    )
    return DiffHeader(
        h.version,
        h.base_hash,
        h.target_hash,
        infos,
        h.header_len,
        h.table_len,
        h.data_len,
        len(data),
    )


def size_breakdown(data: bytes) -> dict[str, int]:
    """Bytes per section: header, table, indices, values (of sparse tensors), dense, checksum,
    and total."""
    h, entries = _parse(data)
    sparse = [e for e in entries if e.layout == LAYOUT_SPARSE]
    return {
        "header": h.header_len,
        "table": h.table_len,
        "indices": sum(e.index.stored_len for e in sparse if e.index is not None),
        "values": sum(e.values.stored_len for e in sparse),
        "dense": sum(e.values.stored_len for e in entries if e.layout != LAYOUT_SPARSE),
        "checksum": CHECKSUM_BYTES,
        "total": len(data),
    }


def _check_against_base(entries: list[Entry], base: StateDict) -> None:
    for e in entries:
        if e.name not in base:
            raise BadTableError(f"diff changes tensor {e.name!r}, which the base model lacks")
        t = base[e.name]
        if (e.wd.torch_dtype, e.shape) != (t.dtype, tuple(t.shape)):
            raise BadTableError(
                f"tensor {e.name!r}: diff says {e.wd.name}{e.shape}, "
                f"base has {t.dtype}{tuple(t.shape)}"
            )


def _decode_entry(data: memoryview, e: Entry) -> TensorDelta:
    what = f"tensor {e.name!r}"
    indices = None
    if e.layout == LAYOUT_SPARSE:
        if e.nnz == 0:
            raise BadTableError(f"{what}: a sparse entry must change at least one element")
        if e.index is None:  # read_entry gives every sparse entry one; keep the check local
            raise BadTableError(f"{what}: a sparse entry has no index section")
        sec = e.index
        raw = decompress(data[sec.offset : sec.offset + sec.stored_len], sec, 1, f"{what} indices")
        indices = decode_index(raw, e, f"{what} indices")
    sec = e.values
    raw = decompress(
        data[sec.offset : sec.offset + sec.stored_len], sec, value_elem_size(e), f"{what} values"
    )
    values = decode_values(raw, e, f"{what} values")
    coding = {V_RAW: RAW, V_FP16: FP16, V_ALQ: ALQ}.get(e.value_coding, INT8)
    return TensorDelta(e.name, e.wd, e.shape, coding, indices, np.array(values), e.scale)


def _decode(
    data: bytes, base: StateDict | None, base_arch: ArchSpec | None, base_hash: str | None = None
) -> DecodedArtefact:
    if base is None or base_arch is None:
        raise DiffError(
            f"a {DIFF_ENCODING} artefact needs the base model it applies to and its architecture"
        )
    h, entries = _parse(data)
    base_hash = base_hash or model_hash(base_arch, base)
    if base_hash != h.base_hash:
        raise WrongBaseError(
            f"diff applies to base {h.base_hash[:16]}, given base is {base_hash[:16]}"
        )
    _check_against_base(entries, base)
    view = memoryview(data)
    deltas = [_decode_entry(view, e) for e in entries]
    state = apply_deltas(base, deltas)
    digest = model_hash(base_arch, state)  # a diff keeps the base's architecture
    if digest != h.target_hash:
        raise TargetHashError(
            f"applying the diff gave model {digest[:16]}, the diff promises {h.target_hash[:16]}"
        )
    return DecodedArtefact(
        encoding=DIFF_ENCODING,
        state=state,
        model_hash=digest,
        base_hash=h.base_hash,
        meta={"tensors_changed": str(len(entries))},
    )


def decode_diff(
    data: bytes,
    base: StateDict | None,
    *,
    base_arch: ArchSpec | None = None,
    max_parameters: int | None = None,
) -> DecodedArtefact:
    """Apply a diff to ``base`` (not modified), a model of architecture ``base_arch`` (required:
    the base and target model hashes cover it); raises a :class:`DiffError` subclass if refused.

    ``max_parameters`` is accepted for the decoder registry and not needed: a diff cannot
    change the base's names or shapes, so the result is exactly as large as ``base``."""
    del max_parameters
    return _decode(bytes(data), base, base_arch)


def apply_chain(base: StateDict, diffs: Sequence[bytes], *, base_arch: ArchSpec) -> DecodedArtefact:
    """Apply diffs one after the other to ``base`` (architecture ``base_arch``); each must apply
    to the previous one's result.

    The result's ``base_hash`` is the first diff's base and ``model_hash`` the last target.
    """
    if not diffs:
        raise ValueError("apply_chain needs at least one diff")
    state, known, first = base, None, None
    for i, blob in enumerate(diffs):
        try:
            out = _decode(bytes(blob), state, base_arch, known)
        except DiffError as exc:
            raise type(exc)(f"diff {i + 1} of {len(diffs)} in the chain: {exc}") from exc
        state, known, first = out.state, out.model_hash, first or out.base_hash
    return replace(out, base_hash=first, meta={**out.meta, "chain_length": str(len(diffs))})
