"""Regenerate tests/vectors/model_hash_v2.json from the product
(``python tests/vectors/gen_model_hash_v2.py``).

The file is normative once committed: tests check the product, an independent pure-Python
implementation and a Node.js one against it (docs/protocol.md, "Model hash"). The states are
written out element by element, so nothing here depends on a weight generator.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import torch  # noqa: E402

from shared.models import MODEL_HASH_DOMAIN, ArchSpec, build_model, model_hash  # noqa: E402
from shared.models.identity import arch_bytes  # noqa: E402
from shared.tensors import DTYPE_NAMES, tensor_bytes, tensors_hash, update_tensors_hash  # noqa: E402


def tiny_mlp() -> dict[str, torch.Tensor]:
    return {"net.1.weight": torch.tensor([[0.5, -1.0, 0.25], [2.0, 0.0, -0.125]]),
            "net.1.bias": torch.tensor([1.0, -0.5])}


def tiny_cnn(arch: ArchSpec) -> dict[str, torch.Tensor]:
    """Every tensor of a real CNN (BatchNorm counters included), filled with small exact values."""
    state = {}
    for i, (name, t) in enumerate(sorted(build_model(arch).state_dict().items())):
        n = t.numel()
        if t.dtype == torch.int64:
            state[name] = torch.full(t.shape, 3 + i, dtype=torch.int64)
        else:
            state[name] = (torch.arange(n, dtype=torch.float32) / 8 - i).reshape(t.shape)
    return state


class _Recorder:
    def __init__(self) -> None:
        self.data = bytearray()

    def update(self, data: bytes, /) -> None:
        self.data += data


def case(name: str, note: str, arch: ArchSpec, state: dict[str, torch.Tensor], preimage: bool) -> dict:
    spec = arch_bytes(arch)
    out = {
        "name": name,
        "note": note,
        "arch_json": spec.decode("ascii"),
        "tensors": [{"name": k, "dtype": DTYPE_NAMES[v.dtype], "shape": list(v.shape),
                     "data_hex": tensor_bytes(v).hex()}
                    for k, v in sorted(state.items(), key=lambda kv: kv[0].encode("utf-8"))],
        "tensors_hash": tensors_hash(state),
        "model_hash": model_hash(arch, state),
    }
    if preimage:
        rec = _Recorder()
        rec.update(MODEL_HASH_DOMAIN + struct.pack("<I", len(spec)) + spec)
        update_tensors_hash(rec, state)
        out["preimage_hex"] = rec.data.hex()
    return out


def main() -> None:
    mlp = ArchSpec("mlp", (3,), 2, hidden=())
    cnn = ArchSpec("cnn", (1, 2, 2), 2, hidden=(), channels=(1,))
    cases = [
        case("mlp-3", "Linear(3 -> 2): the worked example of docs/protocol.md", mlp, tiny_mlp(), True),
        case("mlp-1x1x3", "the same tensors under input_shape [1, 1, 3]: another model, another hash",
             ArchSpec("mlp", (1, 1, 3), 2, hidden=()), tiny_mlp(), False),
        case("cnn-1x2x2", "a CNN stage: F32 conv/BatchNorm tensors and an I64 BatchNorm counter", cnn,
             tiny_cnn(cnn), False),
    ]
    doc = {
        "about": "v2 model hash test vectors (docs/protocol.md, Model hash). data_hex: the raw "
                 "little-endian element bytes; preimage_hex: every byte SHA-256 reads.",
        "domain_tag_hex": MODEL_HASH_DOMAIN.hex(),
        "cases": cases,
    }
    (HERE / "model_hash_v2.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
