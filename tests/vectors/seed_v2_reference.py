"""An independent implementation of docs/seed-format.md in the Python standard library alone
(no numpy, no torch, no import from the product), as a client in another language would write
it from the document: the generator, the tensor layout of an architecture, the rules that fill
it, and the v2 model hash (docs/protocol.md) of the result."""

from __future__ import annotations

import hashlib
import json
import math
import struct

M64 = (1 << 64) - 1
DOMAIN = b"edgeloop/seed/v2\x00"


def key(seed: int, name: str) -> int:
    digest = hashlib.sha256(DOMAIN + struct.pack("<Q", seed) + name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


def word(k: int, i: int) -> int:
    z = (k + (i + 1) * 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def uniform_bytes(seed: int, name: str, n: int, fan_in: int) -> bytes:
    """n float32 values, little-endian."""
    k, b = key(seed, name), 1.0 / math.sqrt(float(fan_in))
    return b"".join(struct.pack("<f", (2.0 * ((word(k, i) >> 11) * 2.0**-53) - 1.0) * b) for i in range(n))


# --- the tensors of an architecture (docs/seed-format.md §4) ------------------------------------
# Each entry: (name, dtype, shape, rule) with rule ("uniform", fan_in) or ("const", value).


def _linear(prefix: str, n_in: int, n_out: int, bias: bool) -> list:
    out = [(f"{prefix}.weight", "F32", [n_out, n_in], ("uniform", n_in))]
    return out + ([(f"{prefix}.bias", "F32", [n_out], ("uniform", n_in))] if bias else [])


def _norm(prefix: str, width: int) -> list:
    return [(f"{prefix}.{leaf}", "F32", [width], ("const", 1.0 if leaf in ("weight", "running_var") else 0.0))
            for leaf in ("weight", "bias", "running_mean", "running_var")] + [
        (f"{prefix}.num_batches_tracked", "I64", [], ("const", 0))]


def layout(arch: dict) -> list:
    tensors, sparse, norms = [], 0, []
    if arch["kind"] == "mlp":
        width = math.prod(arch["input_shape"])
        for j, h in enumerate([*arch["hidden"], arch["num_classes"]]):
            tensors += _linear(f"net.{2 * j + 1}", width, h, True)
            width, sparse = h, sparse + 1
    else:
        c, h, w = arch["input_shape"]
        for t, out in enumerate(arch["channels"]):
            for u in range(2):
                tensors.append((f"features.{7 * t + 3 * u}.weight", "F32", [out, c, 3, 3], ("uniform", c * 9)))
                norms.append((f"features.{7 * t + 3 * u + 1}", out))
                c, sparse = out, sparse + 1
            h, w = h // 2, w // 2
        width = c * h * w
        for j, hid in enumerate(arch["hidden"]):
            tensors += _linear(f"classifier.{3 * j + 1}", width, hid, False)
            norms.append((f"classifier.{3 * j + 2}", hid))
            width, sparse = hid, sparse + 1
        tensors += _linear(f"classifier.{3 * len(arch['hidden']) + 1}", width, arch["num_classes"], True)
        sparse += 1
        for prefix, width_ in norms:
            tensors += _norm(prefix, width_)
    dress = arch["extra"].get("dress")
    if dress is not None:
        k = len(dress["sparsities"])
        tensors.append(("dress.counts", "I64", [k, sparse], ("const", 0)))
        for sub in range(k):
            for prefix, width_ in norms:
                tensors += [(f"dress.norm.{sub}.{n}", d, s, r) for n, d, s, r in _norm(prefix, width_)
                            if not n.endswith("num_batches_tracked")]
    return tensors


def tensor_bytes(seed: int, name: str, dtype: str, shape: list, rule: tuple) -> bytes:
    n = math.prod(shape)
    if rule[0] == "uniform":
        return uniform_bytes(seed, name, n, rule[1])
    return struct.pack(f"<{n}{'f' if dtype == 'F32' else 'q'}", *([rule[1]] * n))


def model_hash(arch_json: str, seed: int) -> tuple[str, dict[str, bytes]]:
    """The v2 model hash of the model ``seed`` generates for ``arch_json`` (canonical JSON),
    and every tensor's bytes."""
    tensors = {name: (dtype, shape, tensor_bytes(seed, name, dtype, shape, rule))
               for name, dtype, shape, rule in layout(json.loads(arch_json))}
    spec = arch_json.encode("ascii")
    h = hashlib.sha256(b"edgeloop/model-hash/v2\n" + struct.pack("<I", len(spec)) + spec)
    for name in sorted(tensors, key=lambda n: n.encode("utf-8")):
        dtype, shape, data = tensors[name]
        h.update(struct.pack("<I", len(name.encode())) + name.encode() + bytes([len(dtype)]) + dtype.encode())
        h.update(struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape) + data)
    return h.hexdigest(), {name: t[2] for name, t in tensors.items()}
