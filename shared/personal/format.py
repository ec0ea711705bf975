"""``personal/v1``: the bytes of a personal model (docs/learner.md is the byte-level spec).

A safetensors file holding the delta's tensors; its ``__metadata__`` strings name the base
model (by hash only: the base's weights are not in it), the learner and its config, how many
local samples went in, the learner's meta and served arch, ``edgeloop.delta_hash`` (the
:func:`shared.tensors.tensors_hash` of the tensors) and ``edgeloop.personal_hash``, a SHA-256 over
every other metadata entry. Decoding re-derives both hashes, so a flipped byte anywhere, an
edited entry or a delta for another base is refused with :class:`PersonalFormatError`.
Never unpickled: safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from shared.models import ArchSpec
from shared.personal.learner import LEARNER_NAME, PersonalDelta
from shared.tensors import tensors_hash

PERSONAL_ENCODING = "personal/v1"
MAX_PERSONAL_BYTES = 1 << 28  # 256 MiB: far above a head or an adaptor set
_HASH = re.compile(r"^[0-9a-f]{64}\Z")  # \Z, not $: "$" would accept a trailing newline
_DIGITS = re.compile(r"^[0-9]+\Z")
_K = "edgeloop."
KEYS = ("arch", "base_hash", "delta_hash", "encoding", "learner", "learner_config", "meta",
        "personal_hash", "samples")


class PersonalFormatError(ValueError):
    """Personal-model bytes are malformed, corrupt, or belong to another base or learner."""


@dataclass(frozen=True)
class PersonalArtefact:
    """A verified personal model: the delta plus what it was derived from."""

    base_hash: str
    learner: str
    config: dict[str, Any]
    samples: int
    delta: PersonalDelta
    personal_hash: str


def _canonical(obj: Any) -> str:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise PersonalFormatError(f"personal meta is not plain JSON: {exc}") from exc


def personal_hash(metadata: dict[str, str]) -> str:
    """SHA-256 over every ``edgeloop.*`` entry except ``edgeloop.personal_hash``, in UTF-8 byte
    order of the key: u32 key length, key, u32 value length, value (little-endian lengths)."""
    h = hashlib.sha256()
    for key in sorted(metadata, key=lambda k: k.encode("utf-8")):
        if key == _K + "personal_hash":
            continue
        k, v = key.encode("utf-8"), metadata[key].encode("utf-8")
        h.update(struct.pack("<I", len(k)) + k + struct.pack("<I", len(v)) + v)
    return h.hexdigest()


def encode_personal(base_hash: str, learner: str, config: dict[str, Any], samples: int,
                    delta: PersonalDelta) -> tuple[bytes, str]:
    """Serialise a personal model; returns ``(bytes, personal hash)``."""
    if not isinstance(base_hash, str) or not _HASH.match(base_hash):
        raise PersonalFormatError(f"base hash must be 64 lowercase hex digits, got {base_hash!r}")
    if not isinstance(learner, str) or not LEARNER_NAME.match(learner):
        raise PersonalFormatError(f"learner name must match {LEARNER_NAME.pattern}, got {learner!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise PersonalFormatError(f"samples must be a non-negative int, got {samples!r}")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in delta.tensors.items()}
    try:
        delta_hash = tensors_hash(tensors)
    except ValueError as exc:
        raise PersonalFormatError(str(exc)) from exc
    meta = {
        _K + "encoding": PERSONAL_ENCODING,
        _K + "base_hash": base_hash,
        _K + "learner": learner,
        _K + "learner_config": _canonical(config),
        _K + "samples": str(samples),
        _K + "arch": delta.arch.to_json() if delta.arch is not None else "",
        _K + "meta": _canonical(delta.meta),
        _K + "delta_hash": delta_hash,
    }
    digest = personal_hash(meta)
    meta[_K + "personal_hash"] = digest
    return st_save(tensors, metadata=meta), digest


def _metadata(data: bytes) -> dict[str, str]:
    if len(data) < 10:
        raise PersonalFormatError(f"personal model of {len(data)} bytes is truncated")
    n = int.from_bytes(data[:8], "little")
    if not 2 <= n <= len(data) - 8:
        raise PersonalFormatError("personal model has a bad header length")
    try:
        header = json.loads(data[8 : 8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PersonalFormatError(f"personal model header is not JSON: {exc}") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise PersonalFormatError("personal model __metadata__ is not an object of strings")
    return meta


def decode_personal(data: bytes, *, base_hash: str | None = None, learner: str | None = None
                    ) -> PersonalArtefact:
    """Parse and verify; with ``base_hash`` / ``learner`` also require those. Raises
    :class:`PersonalFormatError` on any mismatch."""
    if len(data) > MAX_PERSONAL_BYTES:
        raise PersonalFormatError(f"personal model of {len(data)} bytes exceeds {MAX_PERSONAL_BYTES}")
    meta = _metadata(data)
    if meta.get(_K + "encoding") != PERSONAL_ENCODING:
        raise PersonalFormatError(f"encoding is {meta.get(_K + 'encoding')!r}, not {PERSONAL_ENCODING}")
    keys = {k.removeprefix(_K) for k in meta if k.startswith(_K)}
    if keys != set(KEYS) or len(meta) != len(KEYS):
        raise PersonalFormatError(f"personal metadata keys differ from {PERSONAL_ENCODING}'s: "
                                  f"missing {sorted(set(KEYS) - keys)}, unexpected "
                                  f"{sorted(set(meta) - {_K + k for k in KEYS})}")
    m = {k: meta[_K + k] for k in KEYS}
    if personal_hash(meta) != m["personal_hash"]:
        raise PersonalFormatError("personal hash mismatch: metadata was altered or corrupted")
    if not _HASH.match(m["base_hash"]) or not LEARNER_NAME.match(m["learner"]):
        raise PersonalFormatError("personal metadata names a malformed base hash or learner")
    if base_hash is not None and m["base_hash"] != base_hash:
        raise PersonalFormatError(f"personal model is for base {m['base_hash'][:16]}, "
                                  f"not {base_hash[:16]}")
    if learner is not None and m["learner"] != learner:
        raise PersonalFormatError(f"personal model is by learner {m['learner']!r}, not {learner!r}")
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise PersonalFormatError(f"personal model tensors are corrupt: {exc}") from exc
    try:
        actual = tensors_hash(tensors)
    except ValueError as exc:
        raise PersonalFormatError(str(exc)) from exc
    if actual != m["delta_hash"]:
        raise PersonalFormatError(f"delta hash mismatch: tensors give {actual[:16]}, "
                                  f"metadata claims {m['delta_hash'][:16]}")
    try:
        config, learner_meta = json.loads(m["learner_config"]), json.loads(m["meta"])
        arch = ArchSpec.from_json(m["arch"]) if m["arch"] else None
        if not _DIGITS.match(m["samples"]):  # str.isdigit() would let "²" or "٣" through
            raise ValueError(f"samples is {m['samples']!r}")
        samples = int(m["samples"])
        if not isinstance(config, dict) or not isinstance(learner_meta, dict):
            raise ValueError("learner_config and meta must be JSON objects")
        delta = PersonalDelta(dict(tensors), meta=learner_meta, arch=arch)
    except ValueError as exc:  # JSON, ArchSpec and LearnerError are all ValueErrors
        raise PersonalFormatError(f"personal metadata is malformed: {exc}") from exc
    return PersonalArtefact(m["base_hash"], m["learner"], config, samples, delta,
                            m["personal_hash"])

