"""Regenerate tests/vectors/seed_v2.json from the product (``python tests/vectors/gen_seed_v2.py``).

The file is normative once committed: tests check the product, an independent pure-Python
implementation and a Node.js one against it, so regenerate only together with a new
``GENERATOR`` name (docs/seed-format.md).
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from shared.artefacts import encode_seed_model  # noqa: E402
from shared.models import ArchSpec, build_model, init_weights_from_seed  # noqa: E402
from shared.models.identity import model_hash  # noqa: E402
from shared.models.seedgen import GENERATOR, KEY_DOMAIN, tensor_key, uniform, words  # noqa: E402
from shared.tensors import tensor_bytes  # noqa: E402

FIRST = 8  # words and values listed per stream
STREAMS = [  # (seed, tensor name, fan_in)
    (0, "net.1.weight", 784),
    (1, "net.1.bias", 784),
    (42, "features.0.weight", 9),
    (2**63 - 1, "classifier.4.weight", 3),
    (7, "", 1),
    (123456789, "caf\u00e9.\u540d.weight", 2),  # non-ASCII: the name is hashed as UTF-8
]
LATE = [1 << 20, (1 << 20) + 1, 10**9]  # word indices far from the start (block edges, big counters)
MODELS = [
    (ArchSpec("mlp", (3,), 2, hidden=(4,)), 5),
    (ArchSpec("cnn", (1, 4, 4), 2, hidden=(3,), channels=(2,)), 11),
    (ArchSpec("cnn", (1, 4, 4), 2, hidden=(3,), channels=(2,), extra={"dress": {"sparsities": [0.0, 0.5]}}), 11),
    (ArchSpec("mlp", (1, 28, 28), 10, hidden=(512, 512)), 2**40 + 3),
]


def f32_hex(values) -> list[str]:
    return [struct.pack(">f", float(v)).hex() for v in values]


def stream_case(seed: int, name: str, fan_in: int) -> dict:
    return {
        "seed": str(seed), "name": name, "fan_in": fan_in,
        "key": f"{tensor_key(seed, name):016x}",
        "words": [f"{int(w):016x}" for w in words(seed, name, FIRST)],
        "late_words": {str(i): f"{int(words(seed, name, 1, i)[0]):016x}" for i in LATE},
        "float32": f32_hex(uniform(seed, name, FIRST, fan_in)),
    }


def model_case(arch: ArchSpec, seed: int) -> dict:
    state = init_weights_from_seed(build_model(arch), seed).state_dict()
    digest = model_hash(arch, state)
    import hashlib

    tensors = [{
        "name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
        "first": f32_hex(t.flatten()[:4].tolist()) if t.is_floating_point() else [int(v) for v in t.flatten()[:4]],
        "sha256": hashlib.sha256(tensor_bytes(t)).hexdigest(),
    } for name, t in state.items()]
    return {"arch_json": arch.to_json(), "seed": str(seed), "tensors": tensors, "model_hash": digest,
            "artefact": encode_seed_model(arch, seed, digest).decode("ascii")}


def main() -> None:
    out = {
        "about": "model/seed-v2 test vectors (docs/seed-format.md); floats as big-endian IEEE-754 "
                 "binary32 hex, words and keys as hex u64, tensor sha256 over little-endian bytes",
        "generator": GENERATOR,
        "key_domain_hex": KEY_DOMAIN.hex(),
        "streams": [stream_case(*c) for c in STREAMS],
        "models": [model_case(*c) for c in MODELS],
    }
    (HERE / "seed_v2.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
