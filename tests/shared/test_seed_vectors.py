"""model/seed-v2 is rebuildable outside PyTorch/numpy (issue 8, fault 3): the product, an
independent pure-Python implementation and a Node.js one, both written from
docs/seed-format.md, all match tests/vectors/seed_v2.json bit for bit, down to the model hash."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.artefacts import SEED_MODEL_ENCODING, decode_artefact, encode_seed_model
from shared.models import ArchSpec, build_model, init_weights_from_seed
from shared.models.identity import model_hash
from shared.models.seedgen import GENERATOR, KEY_DOMAIN, stream, tensor_key, uniform, words
from shared.tensors import tensor_bytes

VECTORS_DIR = Path(__file__).resolve().parents[1] / "vectors"
VECTORS = json.loads((VECTORS_DIR / "seed_v2.json").read_text(encoding="utf-8"))
sys.path.insert(0, str(VECTORS_DIR))
import seed_v2_reference as ref  # noqa: E402  (tests/vectors/, stdlib only)


def _f32_hex(values) -> list[str]:
    return [struct.pack(">f", float(v)).hex() for v in values]


def test_vectors_name_this_generator():
    assert VECTORS["generator"] == GENERATOR == "splitmix64-sha256/1"
    assert bytes.fromhex(VECTORS["key_domain_hex"]) == KEY_DOMAIN


def test_stream_is_splitmix64():
    # SplitMix64 started at state 0 (the published reference sequence).
    assert [f"{int(w):016x}" for w in stream(0, 4)] == [
        "e220a8397b1dcdaf", "6e789e6aa1b965f4", "06c45d188009454f", "f88bb8a8724c81ec"]


@pytest.mark.parametrize("case", VECTORS["streams"], ids=lambda c: f"{c['seed']}:{c['name']}")
def test_product_generator_matches_vectors(case):
    seed, name = int(case["seed"]), case["name"]
    assert f"{tensor_key(seed, name):016x}" == case["key"]
    assert [f"{int(w):016x}" for w in words(seed, name, len(case["words"]))] == case["words"]
    for i, w in case["late_words"].items():
        assert f"{int(words(seed, name, 1, int(i))[0]):016x}" == w
    assert _f32_hex(uniform(seed, name, len(case["float32"]), case["fan_in"])) == case["float32"]


def test_block_boundary_does_not_change_values():
    # uniform() fills in blocks of 2^20: values around a block edge, and the last ones, must
    # equal the element-wise definition (here the stdlib reference's).
    n = (1 << 20) + 3
    big = uniform(3, "w", n, 5)
    k, b = ref.key(3, "w"), 1.0 / 5**0.5
    for i in ((1 << 20) - 1, 1 << 20, n - 1):
        expected = struct.pack(">f", (2.0 * ((ref.word(k, i) >> 11) * 2.0**-53) - 1.0) * b)
        assert struct.pack(">f", float(big[i])) == expected, i


@pytest.mark.parametrize("case", VECTORS["models"], ids=lambda c: c["arch_json"][:40])
def test_product_models_match_vectors(case):
    arch = ArchSpec.from_json(case["arch_json"])
    state = init_weights_from_seed(build_model(arch), int(case["seed"])).state_dict()
    assert [t["name"] for t in case["tensors"]] == list(state)
    for t in case["tensors"]:
        got = state[t["name"]]
        assert (str(got.dtype).removeprefix("torch."), list(got.shape)) == (t["dtype"], t["shape"])
        assert hashlib.sha256(tensor_bytes(got)).hexdigest() == t["sha256"], t["name"]
    assert model_hash(arch, state) == case["model_hash"]
    # the artefact in the file is what the server encodes, and it decodes to that hash
    assert encode_seed_model(arch, int(case["seed"]), case["model_hash"]).decode() == case["artefact"]
    decoded = decode_artefact(case["artefact"].encode())
    assert (decoded.encoding, decoded.model_hash) == (SEED_MODEL_ENCODING, case["model_hash"])


@pytest.mark.parametrize("case", VECTORS["streams"], ids=lambda c: f"{c['seed']}:{c['name']}")
def test_pure_python_reference_matches_vectors(case):
    seed, name = int(case["seed"]), case["name"]
    k = ref.key(seed, name)
    assert f"{k:016x}" == case["key"]
    assert [f"{ref.word(k, i):016x}" for i in range(len(case["words"]))] == case["words"]
    assert {i: f"{ref.word(k, int(i)):016x}" for i in case["late_words"]} == case["late_words"]
    data = ref.uniform_bytes(seed, name, len(case["float32"]), case["fan_in"])
    assert [data[i : i + 4][::-1].hex() for i in range(0, len(data), 4)] == case["float32"]


@pytest.mark.parametrize("case", VECTORS["models"], ids=lambda c: c["arch_json"][:40])
def test_pure_python_reference_rebuilds_the_model_hash(case):
    digest, tensors = ref.model_hash(case["arch_json"], int(case["seed"]))
    assert sorted(tensors) == sorted(t["name"] for t in case["tensors"])  # the documented layout
    for t in case["tensors"]:
        assert hashlib.sha256(tensors[t["name"]]).hexdigest() == t["sha256"], t["name"]
    assert digest == case["model_hash"]


def test_node_reference_matches_vectors():
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the Node.js implementation of docs/seed-format.md cannot run")
    out = subprocess.run([node, str(VECTORS_DIR / "seed_v2_reference.mjs"), str(VECTORS_DIR / "seed_v2.json")],
                         capture_output=True, text=True, timeout=300, check=True)
    got = json.loads(out.stdout)
    for case, mine in zip(VECTORS["streams"], got["streams"], strict=True):
        assert mine == {k: case[k] for k in ("key", "words", "late_words", "float32")}, case["name"]
    for case, mine in zip(VECTORS["models"], got["models"], strict=True):
        assert mine["arch_json"] == case["arch_json"]
        assert mine["tensors"] == {t["name"]: t["sha256"] for t in case["tensors"]}
        assert mine["model_hash"] == mine["model_hash_claimed"] == case["model_hash"]


def test_values_follow_the_documented_bounds():
    arch = ArchSpec("cnn", (1, 12, 12), 10, hidden=(8,), channels=(4,))
    state = init_weights_from_seed(build_model(arch), 3).state_dict()
    for name, fan_in in (("features.0.weight", 9), ("features.3.weight", 36), ("classifier.1.weight", 144),
                         ("classifier.4.weight", 8), ("classifier.4.bias", 8)):
        w = state[name]
        bound = 1 / fan_in**0.5
        assert w.abs().max() <= bound and w.abs().max() > 0.5 * bound, name
    assert torch.equal(state["features.1.running_var"], torch.ones(4))
    assert int(state["features.1.num_batches_tracked"]) == 0
