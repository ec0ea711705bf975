"""The v2 model hash: it covers the architecture (issue 8 fault 1), matches the documented
bytes and the test vectors, and an artefact whose architecture was edited is refused."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from shared.artefacts import (
    ArtefactError,
    decode_artefact,
    decode_v1_full_model,
    encode_full_model,
)
from shared.models import (
    MODEL_HASH_DOMAIN,
    ArchSpec,
    build_model,
    default_spec,
    init_weights_from_seed,
    model_hash,
)
from shared.tensors import DTYPE_NAMES, tensors_hash
from tests.legacy_identity import v1_full_artefact
from tests.vectors import model_hash_v2_reference as reference

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "tests" / "vectors" / "model_hash_v2.json"
CASES = json.loads(VECTORS.read_text())["cases"]
MNIST_MLP = default_spec("mlp", (1, 28, 28), 10)
FLAT_MLP = default_spec("mlp", (784,), 10)  # the same tensors as MNIST_MLP


def _state_of(case: dict) -> dict[str, torch.Tensor]:
    dtypes = {v: k for k, v in DTYPE_NAMES.items()}
    out = {}
    for t in case["tensors"]:
        raw = bytearray(bytes.fromhex(t["data_hex"]))
        out[t["name"]] = torch.frombuffer(raw, dtype=dtypes[t["dtype"]]).reshape(t["shape"]).clone()
    return out


def _mnist_state() -> dict[str, torch.Tensor]:
    model = init_weights_from_seed(build_model(MNIST_MLP), 3)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _edit_metadata(data: bytes, **changes: str) -> bytes:
    """``data`` with ``__metadata__`` entries replaced; the tensor bytes are left untouched."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"].update(changes)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_the_product_gives_the_vectors(case):
    arch = ArchSpec.from_json(case["arch_json"])
    assert arch.to_json() == case["arch_json"]  # the vectors hold canonical JSON
    state = _state_of(case)
    assert model_hash(arch, state) == case["model_hash"]
    assert tensors_hash(state) == case["tensors_hash"]
    assert set(state) == set(build_model(arch).state_dict())  # real models, not loose tensors


def test_the_preimage_is_the_documented_layout():
    case = CASES[0]
    pre = bytes.fromhex(case["preimage_hex"])
    spec = case["arch_json"].encode("ascii")
    assert pre.startswith(MODEL_HASH_DOMAIN + len(spec).to_bytes(4, "little") + spec)
    assert MODEL_HASH_DOMAIN == b"edgeloop/model-hash/v2\n"
    assert hashlib.sha256(pre).hexdigest() == case["model_hash"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_an_independent_stdlib_implementation_gives_the_vectors(case):
    tensors = [(t["name"], t["dtype"], t["shape"], bytes.fromhex(t["data_hex"])) for t in case["tensors"]]
    assert reference.model_hash(case["arch_json"], tensors[::-1]) == case["model_hash"]


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js")
def test_an_independent_node_implementation_gives_the_vectors():
    script = ROOT / "tests" / "vectors" / "model_hash_v2_reference.mjs"
    out = subprocess.run(["node", str(script), str(VECTORS)], capture_output=True, text=True, check=True,
                         timeout=60).stdout.split("\n")
    assert [line for line in out if line] == [f"{c['name']} {c['model_hash']}" for c in CASES]


def test_the_protocol_doc_shows_the_vector():
    doc = (ROOT / "docs" / "protocol.md").read_text()
    block = re.search(r"<!-- model-hash-example -->(.*?)<!-- /model-hash-example -->", doc, re.S)
    assert block is not None
    text = block.group(1)
    case = CASES[0]
    assert case["arch_json"] in text and case["model_hash"] in text
    assert "".join(re.findall(r"^    ([0-9a-f ]+)$", text, re.M)).replace(" ", "") == case["preimage_hex"]


def test_the_hash_covers_the_architecture():
    """Two architectures that build identical tensors are two models."""
    state = _mnist_state()
    assert set(build_model(FLAT_MLP).state_dict()) == set(state)
    assert model_hash(MNIST_MLP, state) != model_hash(FLAT_MLP, state)
    assert CASES[0]["tensors_hash"] == CASES[1]["tensors_hash"]
    assert CASES[0]["model_hash"] != CASES[1]["model_hash"]


def test_an_edited_architecture_is_refused_with_the_tensors_unchanged():
    """The issue's case: ``edgeloop.arch`` input_shape [1,28,28] -> [784] in a real artefact,
    tensors and claimed hash unchanged. Before v2 this decoded (and was installed)."""
    data, digest = encode_full_model(MNIST_MLP, _mnist_state())
    edited = _edit_metadata(data, **{"edgeloop.arch": FLAT_MLP.to_json()})
    assert edited[-1000:] == data[-1000:]
    with pytest.raises(ArtefactError, match="model hash mismatch"):
        decode_artefact(edited)
    # Claiming the edited model's own hash makes it decode, as another model: the agent's
    # check against the hash the server announced (and the store's) then refuses it.
    recomputed = _edit_metadata(data, **{"edgeloop.arch": FLAT_MLP.to_json(),
                                         "edgeloop.model_hash": model_hash(FLAT_MLP, _mnist_state())})
    assert decode_artefact(recomputed).model_hash != digest


def test_a_non_canonical_architecture_text_is_refused():
    data, _ = encode_full_model(MNIST_MLP, _mnist_state())
    spaced = json.dumps(json.loads(MNIST_MLP.to_json()), sort_keys=True)  # ", " and ": "
    with pytest.raises(ArtefactError, match="canonical"):
        decode_artefact(_edit_metadata(data, **{"edgeloop.arch": spaced}))


def test_a_v1_artefact_is_refused_by_name_and_upgrades_explicitly():
    state = _mnist_state()
    old, v1 = v1_full_artefact(MNIST_MLP, state, extra={"round": "r7"})
    with pytest.raises(ArtefactError, match="v1 model hash"):
        decode_artefact(old)
    legacy = decode_v1_full_model(old)
    assert legacy.v1_hash == v1 == tensors_hash(state)
    assert legacy.decoded.model_hash == model_hash(MNIST_MLP, state)
    assert legacy.decoded.arch == MNIST_MLP and legacy.decoded.meta == {"round": "r7"}
    # ...but only with tensors that match their v1 hash.
    tampered = _edit_metadata(old, **{"edgeloop.model_hash": "0" * 64})
    with pytest.raises(ArtefactError, match="v1 model hash mismatch"):
        decode_v1_full_model(tampered)
    new, _ = encode_full_model(MNIST_MLP, state)
    with pytest.raises(ArtefactError):  # a v2 artefact is not a v1 one
        decode_v1_full_model(new)
