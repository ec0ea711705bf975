"""Model artefacts: the bytes a server publishes and an agent installs.

An artefact has an *encoding* (how to turn bytes into tensors). Two kinds exist:

* ``model/safetensors-v1``: a full model, a safetensors file whose ``__metadata__`` carries
  ``edgeloop.encoding``, ``edgeloop.arch`` (the canonical JSON :class:`ArchSpec`),
  ``edgeloop.model_hash`` (:func:`shared.tensors.model_hash` of the tensors) and
  ``edgeloop.parent`` (the parent version's model hash, or empty).
* diffs against a base model (``diff/...``), registered by the diff codec: they need the base
  state to decode, and name the base model hash they apply to.

Every decoder checks the model hash of what it produced against the hash the artefact claims,
so a corrupt artefact fails here rather than being installed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from shared.models.spec import ArchSpec
from shared.tensors import StateDict, model_hash

FULL_MODEL_ENCODING = "model/safetensors-v1"
MAX_ARTEFACT_BYTES = 1 << 31  # 2 GiB: far above any edge model, bounds what we will parse


class ArtefactError(ValueError):
    """An artefact is malformed, corrupt, or does not apply to the given base model."""


@dataclass(frozen=True)
class DecodedArtefact:
    """What decoding produced: a complete state, verified against ``model_hash``."""

    encoding: str
    state: dict[str, torch.Tensor]
    model_hash: str
    base_hash: str | None = None  # set for diffs: the model they were applied to
    arch: ArchSpec | None = None  # set for full models (diffs keep the base's architecture)
    parent_hash: str | None = None
    meta: dict[str, str] = field(default_factory=dict)


Decoder = Callable[[bytes, StateDict | None], DecodedArtefact]
_DECODERS: dict[str, Decoder] = {}
_SNIFFERS: list[tuple[Callable[[bytes], bool], str]] = []


def register_decoder(encoding: str, decoder: Decoder, sniff: Callable[[bytes], bool]) -> None:
    """Plug in a decoder (the diff codec does this); ``sniff`` recognises its bytes."""
    _DECODERS[encoding] = decoder
    _SNIFFERS.append((sniff, encoding))


def sniff_encoding(data: bytes) -> str:
    for sniff, encoding in _SNIFFERS:
        if sniff(data):
            return encoding
    raise ArtefactError("unrecognised artefact: neither a safetensors model nor a known diff")


def decode_artefact(
    data: bytes, base: StateDict | None = None, *, encoding: str | None = None
) -> DecodedArtefact:
    """Decode and verify any registered artefact. Raises :class:`ArtefactError`."""
    if len(data) > MAX_ARTEFACT_BYTES:
        raise ArtefactError(f"artefact of {len(data)} bytes exceeds the {MAX_ARTEFACT_BYTES} limit")
    encoding = encoding or sniff_encoding(data)
    if encoding not in _DECODERS:
        raise ArtefactError(f"unknown artefact encoding {encoding!r}")
    return _DECODERS[encoding](data, base)


def encode_full_model(
    arch: ArchSpec, state: StateDict, parent_hash: str | None = None, extra: dict[str, str] | None = None
) -> tuple[bytes, str]:
    """Serialise a full model; returns ``(artefact bytes, model hash)``."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    digest = model_hash(tensors)
    meta = {
        "edgeloop.encoding": FULL_MODEL_ENCODING,
        "edgeloop.arch": arch.to_json(),
        "edgeloop.model_hash": digest,
        "edgeloop.parent": parent_hash or "",
    }
    for key, value in (extra or {}).items():
        meta[f"edgeloop.extra.{key}"] = str(value)
    return st_save(tensors, metadata=meta), digest


def _looks_like_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    n = int.from_bytes(data[:8], "little")
    return 2 <= n <= len(data) - 8 and data[8:9] == b"{"


def _read_safetensors_metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtefactError(f"model artefact header is not JSON: {exc}") from exc
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ArtefactError("model artefact __metadata__ is not an object")
    return meta


def decode_full_model(data: bytes, base: StateDict | None = None) -> DecodedArtefact:
    """Decode a ``model/safetensors-v1`` artefact (``base`` is ignored)."""
    del base
    if not _looks_like_safetensors(data):
        raise ArtefactError("not a safetensors model artefact (bad header length)")
    meta = _read_safetensors_metadata(data)
    if meta.get("edgeloop.encoding") != FULL_MODEL_ENCODING:
        raise ArtefactError(f"model artefact has encoding {meta.get('edgeloop.encoding')!r}")
    try:
        arch = ArchSpec.from_json(meta.get("edgeloop.arch", ""))
    except ValueError as exc:
        raise ArtefactError(f"model artefact has a bad architecture spec: {exc}") from exc
    try:
        state = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ArtefactError(f"model artefact is corrupt or truncated: {exc}") from exc
    claimed = meta.get("edgeloop.model_hash", "")
    actual = model_hash(state)
    if actual != claimed:
        raise ArtefactError(f"model hash mismatch: artefact claims {claimed[:16]}, tensors give {actual[:16]}")
    extra = {k.removeprefix("edgeloop.extra."): v for k, v in meta.items() if k.startswith("edgeloop.extra.")}
    return DecodedArtefact(
        encoding=FULL_MODEL_ENCODING,
        state=state,
        model_hash=actual,
        arch=arch,
        parent_hash=meta.get("edgeloop.parent") or None,
        meta=extra,
    )


register_decoder(FULL_MODEL_ENCODING, decode_full_model, _looks_like_safetensors)
