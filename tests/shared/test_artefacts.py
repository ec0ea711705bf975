"""Full-model artefacts: exact round trip, and every kind of damage refused with ArtefactError."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save as st_save

from shared.artefacts import (
    FULL_MODEL_ENCODING,
    ArtefactError,
    DecodedArtefact,
    decode_artefact,
    encode_full_model,
    register_decoder,
    sniff_encoding,
)
from shared.models import ArchSpec, build_model, init_weights_from_seed
from shared.tensors import model_hash

ARCH = ArchSpec("cnn", (1, 12, 12), 5, hidden=(8,), channels=(4,))


def _state(seed: int = 0, arch: ArchSpec = ARCH) -> dict[str, torch.Tensor]:
    return init_weights_from_seed(build_model(arch), seed).state_dict()


def _header(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n])


def _with_metadata(state: dict[str, torch.Tensor], **changes: str | None) -> bytes:
    """A safetensors file with the real tensors and edited EdgeLoop metadata."""
    meta = {
        "edgeloop.encoding": FULL_MODEL_ENCODING,
        "edgeloop.arch": ARCH.to_json(),
        "edgeloop.model_hash": model_hash(state),
        "edgeloop.parent": "",
    }
    for k, v in changes.items():
        key = "edgeloop." + k
        if v is None:
            meta.pop(key)
        else:
            meta[key] = v
    return st_save({k: v.contiguous() for k, v in state.items()}, metadata=meta)


def _raw_header_artefact(header: dict, body: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + body


def test_full_model_round_trip_is_exact():
    state = _state(3)
    parent = "ab" * 32
    data, digest = encode_full_model(ARCH, state, parent_hash=parent, extra={"round": "r1", "val": 0.93})
    assert digest == model_hash(state)
    assert sniff_encoding(data) == FULL_MODEL_ENCODING
    out = decode_artefact(data)
    assert isinstance(out, DecodedArtefact)
    assert out.encoding == FULL_MODEL_ENCODING and out.model_hash == digest
    assert out.arch == ARCH and out.parent_hash == parent and out.base_hash is None
    assert out.meta == {"round": "r1", "val": "0.93"}
    assert set(out.state) == set(state)
    for k, v in state.items():
        assert out.state[k].dtype == v.dtype and torch.equal(out.state[k], v)  # includes int64 buffers
    # The decoded state loads into the architecture it names and predicts identically.
    a, b = build_model(ARCH).eval(), build_model(out.arch).eval()
    a.load_state_dict(state)
    b.load_state_dict(out.state)
    x = torch.rand(4, *ARCH.input_shape)
    assert torch.equal(a(x), b(x))


def test_identity_is_the_model_hash_and_parent_is_optional():
    state = _state(1)
    # (The bytes themselves are not canonical: safetensors writes its metadata map in hash
    # order. The model hash is the identity that matters.)
    a, digest = encode_full_model(ARCH, state)
    b, digest_b = encode_full_model(ARCH, dict(reversed(list(state.items()))))
    assert digest_b == digest and decode_artefact(b).model_hash == digest
    assert decode_artefact(a).parent_hash is None


def test_flipped_tensor_byte_fails_the_hash_check():
    data = bytearray(encode_full_model(ARCH, _state())[0])
    data[-3] ^= 0x10  # inside the last tensor's bytes
    with pytest.raises(ArtefactError, match="hash mismatch"):
        decode_artefact(bytes(data))


@pytest.mark.parametrize("cut", [1, 7, 100])
def test_truncated_artefact_is_refused(cut):
    data = encode_full_model(ARCH, _state())[0]
    with pytest.raises(ArtefactError):
        decode_artefact(data[:-cut])


@pytest.mark.parametrize("data", [b"", b"short", b"\x00" * 64, b"PK\x03\x04 a zip file" * 4])
def test_garbage_is_refused(data):
    with pytest.raises(ArtefactError):
        decode_artefact(data)


def test_header_cut_or_not_json_is_refused():
    data = encode_full_model(ARCH, _state())[0]
    n = int.from_bytes(data[:8], "little")
    with pytest.raises(ArtefactError):
        decode_artefact(data[: 8 + n // 2])  # header length points past the end
    broken = data[:9] + b"\xff" * 10 + data[19:]
    with pytest.raises(ArtefactError):
        decode_artefact(broken)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"encoding": None}, "encoding"),
        ({"encoding": "diff/sparse-v1"}, "encoding"),
        ({"arch": None}, "architecture"),
        ({"arch": "{not json"}, "architecture"),
        ({"arch": '{"kind": "mlp", "input_shape": [4], "num_classes": 2, "x": 1}'}, "architecture"),
        ({"model_hash": "0" * 64}, "hash mismatch"),
        ({"model_hash": None}, "hash mismatch"),
    ],
)
def test_bad_metadata_is_refused(changes, message):
    with pytest.raises(ArtefactError, match=message):
        decode_artefact(_with_metadata(_state(), **changes), encoding=FULL_MODEL_ENCODING)


def test_metadata_values_that_are_not_strings_are_refused():
    state = _state()
    honest = _header(_with_metadata(state))
    body = encode_full_model(ARCH, state)[0]
    body = body[8 + int.from_bytes(body[:8], "little"):]
    for key, value in (("edgeloop.arch", json.loads(ARCH.to_json())), ("edgeloop.model_hash", 7)):
        header = {**honest, "__metadata__": {**honest["__metadata__"], key: value}}
        with pytest.raises(ArtefactError):
            decode_artefact(_raw_header_artefact(header, body))
    with pytest.raises(ArtefactError):
        decode_artefact(_raw_header_artefact({**honest, "__metadata__": ["not", "a", "dict"]}, body))


def test_tensors_that_do_not_fit_the_named_architecture_are_refused():
    """The hash only proves the tensors are the ones the producer meant; a spec that does not
    describe them would make the agent install a model it cannot load."""
    other = ArchSpec("mlp", (1, 12, 12), 5, hidden=(8,))
    data, _ = encode_full_model(ARCH, _state(0, other))
    with pytest.raises(ArtefactError, match="architecture"):
        decode_artefact(data)
    bigger = ArchSpec("cnn", (1, 12, 12), 5, hidden=(9,), channels=(4,))
    data, _ = encode_full_model(ARCH, _state(0, bigger))
    with pytest.raises(ArtefactError, match="architecture"):
        decode_artefact(data)


def test_unhashable_dtype_is_an_artefact_error():
    state = {**_state(), "extra": torch.zeros(2, dtype=torch.complex64)}
    meta = {"edgeloop.encoding": FULL_MODEL_ENCODING, "edgeloop.arch": ARCH.to_json(),
            "edgeloop.model_hash": "0" * 64, "edgeloop.parent": ""}
    with pytest.raises(ArtefactError):
        decode_artefact(st_save({k: v.contiguous() for k, v in state.items()}, metadata=meta))


def test_unknown_encoding_and_registry():
    data = encode_full_model(ARCH, _state())[0]
    with pytest.raises(ArtefactError, match="unknown artefact encoding"):
        decode_artefact(data, encoding="diff/never-registered")

    magic = b"TESTDIFF"

    def decode_test(payload: bytes, base):
        if base is None:
            raise ArtefactError("needs a base")
        state = {k: v + 1 for k, v in base.items()}
        return DecodedArtefact("diff/test-v0", state, model_hash(state), base_hash=model_hash(base))

    register_decoder("diff/test-v0", decode_test, lambda d: d.startswith(magic))
    base = {"w": torch.zeros(3)}
    out = decode_artefact(magic + b"payload", base)
    assert out.encoding == "diff/test-v0" and torch.equal(out.state["w"], torch.ones(3))
    assert out.base_hash == model_hash(base)
    # Full models are still recognised with another decoder registered.
    assert decode_artefact(data).encoding == FULL_MODEL_ENCODING
