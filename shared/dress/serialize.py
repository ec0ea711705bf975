"""DRESS-CSR tables as bytes: one safetensors file, tensors plus canonical JSON metadata.

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

from shared.dress.layers import DressError
from shared.dress.tables import FORMAT, DressTables, LayerTable, NormTable, validate_tables
from shared.models.spec import ArchSpec

META_KEY = "dress.meta"  # the one safetensors __metadata__ entry: canonical JSON of meta()
MAX_TABLE_BYTES = 1 << 31  # bound on what tables_from_bytes will parse


def tables_to_safetensors(tables: DressTables) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` ready for ``safetensors.torch.save``."""
    # One metadata key only: safetensors writes metadata maps in hash order, so several keys
    # would make the bytes differ between two saves of the same tables.
    meta = json.dumps(tables.meta(), sort_keys=True, separators=(",", ":"))
    return dict(tables.tensors), {META_KEY: meta}


def tables_to_bytes(tables: DressTables) -> bytes:
    tensors, meta = tables_to_safetensors(tables)
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


def tables_from_safetensors(tensors: Mapping[str, torch.Tensor], meta: Mapping) -> DressTables:
    try:
        if meta["format"] != FORMAT:
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
