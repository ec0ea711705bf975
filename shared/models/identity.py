"""A model's identity: the v2 model hash, which covers the architecture as well as the tensors.

Two different architectures can build identical tensors (an MLP over ``[1, 28, 28]`` and one over
``[784]`` both start with a ``784 x h`` weight), so a hash of the tensors alone would let an edited
``edgeloop.arch`` pass verification and install a model the agent cannot feed. The definition
below is normative; docs/protocol.md ("Model hash") spells it out byte by byte with a test vector
(tests/vectors/model_hash_v2.json).
"""

from __future__ import annotations

import hashlib
import struct

from shared.models.spec import ArchSpec
from shared.tensors import StateDict, update_tensors_hash

MODEL_HASH_DOMAIN = b"edgeloop/model-hash/v2\n"


def arch_bytes(arch: ArchSpec) -> bytes:
    """The canonical architecture JSON as hashed: ``ArchSpec.to_json()`` (sorted keys, no
    whitespace, non-ASCII escaped), which is always ASCII."""
    return arch.to_json().encode("ascii")


def model_hash(arch: ArchSpec, state: StateDict) -> str:
    """Canonical SHA-256 (hex) of a model: its architecture and its tensors.

    SHA-256 over ``MODEL_HASH_DOMAIN``, u32-LE length of the canonical arch JSON, those bytes,
    then the per-tensor records of :func:`shared.tensors.tensors_hash` (sorted by name).
    """
    spec = arch_bytes(arch)
    h = hashlib.sha256(MODEL_HASH_DOMAIN)
    h.update(struct.pack("<I", len(spec)) + spec)
    update_tensors_hash(h, state)
    return h.hexdigest()
