"""DRESS-CSR tables as bytes: one safetensors file, tensors plus canonical JSON metadata.

Files are written as ``dress-csr/v2`` by default: each layer's columns as a compact set
(:mod:`shared.dress.compact`, a bitmap or uint8 gaps) with the values in column order, the
importance order being re-derived from ``|value|`` on load. ``version=1`` writes the in-memory
layout (``<layer>.index`` in importance order) as before; both are read.

Safe to parse from the network: sizes are bounded, the JSON is checked field by field and the
result goes through :func:`validate_tables` before it is returned. Two saves of the same tables
give the same bytes, so a server and a device can compare tables by hash.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from shared.dress import compact
from shared.dress.layers import DressError
from shared.dress.tables import (
    FORMAT,
    DressTables,
    LayerTable,
    NormTable,
    index_dtype,
    validate_tables,
)
from shared.models.spec import ArchSpec

META_KEY = "dress.meta"  # the one safetensors __metadata__ entry: canonical JSON of meta()
MAX_TABLE_BYTES = 1 << 31  # bound on what tables_from_bytes will parse


FORMAT_V2 = "dress-csr/v2"


def tables_to_safetensors(
    tables: DressTables, *, version: int = 2
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` ready for ``safetensors.torch.save`` (``version`` 2 or 1)."""
    if version not in (1, 2):
        raise DressError(f"DRESS-CSR version must be 1 or 2, got {version!r}")
    validate_tables(tables)  # never write tables that would not load
    meta = tables.meta()
    tensors = dict(tables.tensors)
    if version == 2:
        meta["format"] = FORMAT_V2
        for entry, t in zip(meta["layers"], tables.layers, strict=True):
            index = tensors.pop(f"{t.name}.index").to(torch.int64)
            cols, order = index.sort(dim=1)
            entry["cols"], tensors[f"{t.name}.cols"] = compact.encode(cols, t.row_size)
            tensors[f"{t.name}.value"] = tables.value(t.name).gather(1, order).contiguous()
    # One metadata key only: safetensors writes metadata maps in hash order, so several keys
    # would make the bytes differ between two saves of the same tables.
    return tensors, {META_KEY: json.dumps(meta, sort_keys=True, separators=(",", ":"))}


def tables_to_bytes(tables: DressTables, *, version: int = 2) -> bytes:
    tensors, meta = tables_to_safetensors(tables, version=version)
    return st_save(tensors, metadata=meta)


def tables_from_bytes(data: bytes) -> DressTables:
    """Parse and fully validate serialised tables."""
    if len(data) > MAX_TABLE_BYTES or len(data) < 10:
        raise DressError(f"DRESS tables of {len(data)} bytes are outside [10, {MAX_TABLE_BYTES}]")
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + n])
        meta_text = header.get("__metadata__", {}).get(META_KEY)
        if meta_text is None:
            raise DressError(f"not a {FORMAT} file (no {META_KEY!r} metadata)")
        meta = json.loads(meta_text)
        tensors = st_load(data)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError) as exc:
        raise DressError(f"DRESS tables header is malformed: {exc!r}") from exc
    except (SafetensorError, ValueError, RuntimeError) as exc:
        if isinstance(exc, DressError):
            raise
        raise DressError(f"DRESS tables are corrupt or truncated: {exc}") from exc
    return tables_from_safetensors(tensors, meta)


def _expand_v2(tensors: Mapping[str, torch.Tensor], meta: Mapping) -> dict[str, torch.Tensor]:
    """v2 column sets + column-ordered values -> the in-memory importance-ordered tables."""
    out = dict(tensors)
    for t in meta["layers"]:
        name, shape, counts = str(t["name"]), [int(d) for d in t["shape"]], t["counts"]
        if len(shape) < 2 or not counts or any(d < 1 for d in shape):
            raise DressError(f"layer {name!r}: bad shape {shape} or counts {counts}")
        rows, row_size, n = shape[0], int(torch.Size(shape[1:]).numel()), int(counts[0])
        data, value = out.pop(f"{name}.cols", None), out.get(f"{name}.value")
        if data is None or value is None:
            raise DressError(f"layer {name!r} lacks its cols or value tensor")
        if not 1 <= n <= row_size or tuple(value.shape) != (rows, n):
            raise DressError(f"layer {name!r}: values {tuple(value.shape)} for {n} of {row_size}")
        if not value.is_floating_point() or not torch.isfinite(value).all():
            raise DressError(f"layer {name!r}: values must be finite floats")
        cols = compact.decode(str(t["cols"]), data, rows, row_size, n)
        # Importance order = |value| descending, ties by ascending column (stable sort).
        order = torch.sort(value.abs(), dim=1, descending=True, stable=True).indices
        out[f"{name}.index"] = cols.gather(1, order).to(index_dtype(row_size))
        out[f"{name}.value"] = value.gather(1, order)
    return out


def tables_from_safetensors(tensors: Mapping[str, torch.Tensor], meta: Mapping) -> DressTables:
    try:
        if meta["format"] == FORMAT_V2:
            tensors = _expand_v2(tensors, meta)
        elif meta["format"] != FORMAT:
            raise DressError(f"unknown DRESS format {meta['format']!r}")
        tables = DressTables(
            spec=ArchSpec.from_dict(meta["arch"]),
            sparsities=tuple(float(v) for v in meta["sparsities"]),
            layers=tuple(
                LayerTable(
                    str(t["name"]),
                    str(t["kind"]),
                    tuple(int(d) for d in t["shape"]),
                    tuple(int(c) for c in t["counts"]),
                    bool(t["bias"]),
                )
                for t in meta["layers"]
            ),
            norms=tuple(
                NormTable(
                    str(n["name"]), int(n["channels"]), float(n["eps"]), bool(n["per_subnet"])
                )
                for n in meta["norms"]
            ),
            tensors=dict(tensors),
            source_hash=str(meta["source_hash"]),
        )
    except DressError:
        raise
    except (KeyError, TypeError, ValueError) as exc:  # ArchSpec raises ValueError
        raise DressError(f"DRESS tables metadata is incomplete or invalid: {exc!r}") from exc
    validate_tables(tables)
    return tables


def storage_bytes(tables: DressTables) -> int:
    """Every byte of the serialised tables: header, metadata, indices, values, biases, norms."""
    return len(tables_to_bytes(tables))
