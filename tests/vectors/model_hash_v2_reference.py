"""An independent implementation of the v2 model hash (docs/protocol.md, "Model hash") in the
Python standard library alone, as a client in another language would write it from the
document: no numpy, no torch, no import from the product."""

from __future__ import annotations

import hashlib
import struct

DOMAIN = b"edgeloop/model-hash/v2\n"


def model_hash(arch_json: str, tensors: list[tuple[str, str, list[int], bytes]]) -> str:
    """``arch_json``: the ``edgeloop.arch`` string exactly as stored (canonical JSON);
    ``tensors``: (name, dtype name, shape, raw little-endian element bytes) in any order."""
    spec = arch_json.encode("ascii")
    h = hashlib.sha256(DOMAIN + struct.pack("<I", len(spec)) + spec)
    for name, dtype, shape, data in sorted(tensors, key=lambda t: t[0].encode("utf-8")):
        n = name.encode("utf-8")
        d = dtype.encode("ascii")
        h.update(struct.pack("<I", len(n)) + n + struct.pack("<B", len(d)) + d)
        h.update(struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", s) for s in shape))
        h.update(data)
    return h.hexdigest()
