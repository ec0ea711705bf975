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
from shared.models import ArchSpec, build_model, init_weights_from_seed, model_hash

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
        "edgeloop.model_hash": model_hash(ARCH, state),
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
    assert digest == model_hash(ARCH, state)
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

    def decode_test(payload: bytes, base, base_arch: ArchSpec | None, max_parameters: int):
        if base is None or base_arch is None:
            raise ArtefactError("needs a base and its architecture")
        state = {k: v + 1 for k, v in base.items()}
        return DecodedArtefact("diff/test-v0", state, model_hash(base_arch, state),
                               base_hash=model_hash(base_arch, base))

    register_decoder("diff/test-v0", decode_test, lambda d: d.startswith(magic))
    base = {"w": torch.zeros(3)}
    out = decode_artefact(magic + b"payload", base, base_arch=ARCH)
    assert out.encoding == "diff/test-v0" and torch.equal(out.state["w"], torch.ones(3))
    assert out.base_hash == model_hash(ARCH, base)
    # Full models are still recognised with another decoder registered.
    assert decode_artefact(data).encoding == FULL_MODEL_ENCODING


# --- architecture bounds (issue 8, fault 2) and typed refusals of odd JSON (fault 4) ---------

SMALL = ArchSpec("mlp", (1, 12, 12), 5, hidden=(24,))


def _seed_artefact(arch: dict, seed: object = "7", digest: object = "0" * 64) -> bytes:
    # model/seed-v2 (docs/seed-format.md): arch travels as its canonical JSON text
    text = json.dumps(arch, sort_keys=True, separators=(",", ":")) if isinstance(arch, dict) else arch
    body = {"arch": text, "generator": "splitmix64-sha256/1", "model_hash": digest, "seed": seed}
    return b"ELSEED2\n" + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _mlp(hidden: list[int]) -> dict:
    return {"kind": "mlp", "input_shape": [784], "num_classes": 10, "hidden": hidden,
            "channels": [], "extra": {}}


def test_seed_artefact_naming_a_huge_network_is_refused_before_building():
    """A 209-byte artefact naming hidden [16384, 16384] used to allocate and fill 5 GB; one
    naming [65536, 65536] raised torch's RuntimeError out of the decoder."""
    import resource
    import time

    from shared.artefacts import DEFAULT_MAX_PARAMETERS, ArchLimitError

    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for hidden in ([16384, 16384], [65536, 65536]):
        data = _seed_artefact(_mlp(hidden))
        assert len(data) < 512  # a few hundred bytes (seed-v2 escapes its arch text)
        t0 = time.perf_counter()
        with pytest.raises(ArchLimitError, match=f"max_parameters={DEFAULT_MAX_PARAMETERS}"):
            decode_artefact(data)
        assert time.perf_counter() - t0 < 1.0
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before
    assert grown < 64 << 20  # the process peak did not move: nothing was allocated


def test_max_parameters_is_the_callers_choice():
    from shared.artefacts import ArchLimitError, encode_seed_model
    from shared.models.spec import parameter_count

    state = _state(3, SMALL)
    n = parameter_count(SMALL)
    seed = encode_seed_model(SMALL, 3, model_hash(SMALL, state))
    full, _ = encode_full_model(SMALL, state)
    for data in (seed, full):
        assert decode_artefact(data, max_parameters=n).model_hash == model_hash(SMALL, state)
        with pytest.raises(ArchLimitError, match=f"has {n} backbone parameters.*={n - 1}"):
            decode_artefact(data, max_parameters=n - 1)


def test_full_model_whose_arch_metadata_is_huge_is_refused_before_its_tensors_are_read():
    from shared.artefacts import ArchLimitError

    state = _state(0, SMALL)
    huge = ArchSpec("mlp", (1, 12, 12), 5, hidden=(65536, 65536)).to_json()
    with pytest.raises(ArchLimitError, match="max_parameters"):
        decode_artefact(_with_metadata(state, arch=huge))
    # counted with its model families: a DRESS section's buffers count too
    dress = ArchSpec("cnn", (1, 12, 12), 5, hidden=(8,), channels=(4,),
                     extra={"dress": {"sparsities": [0.0, 0.5]}})
    from shared.artefacts import check_arch_bounds

    with torch.device("meta"):
        exact = sum(t.numel() for t in build_model(dress).state_dict().values())
    assert check_arch_bounds(dress, exact) == exact
    with pytest.raises(ArchLimitError, match="model families"):
        check_arch_bounds(dress, exact - 1)


@pytest.mark.parametrize("spec", [
    ArchSpec("mlp", (784,), 10, hidden=(512, 512)),
    ArchSpec("mlp", (3, 4, 5), 2, hidden=()),
    ArchSpec("cnn", (1, 28, 28), 10, hidden=(256,), channels=(32, 64, 128)),
    ArchSpec("cnn", (3, 9, 7), 4, hidden=(), channels=(5, 6)),
])
def test_parameter_count_is_exact_without_building(spec):
    from shared.models.spec import parameter_count

    with torch.device("meta"):
        built = sum(t.numel() for t in build_model(spec).state_dict().values())
    assert parameter_count(spec) == built


@pytest.mark.parametrize("field, value, match", [
    ("hidden", [8] * 65, "hidden layers"),
    ("input_shape", [4096, 4097], "elements"),
    ("extra", {"dress": {"sparsities": [i / 3000 for i in range(2999)]}}, "bytes exceeds"),
])
def test_spec_structure_is_bounded(field, value, match):
    with pytest.raises(ValueError, match=match):
        ArchSpec.from_dict({**_mlp([8]), field: value})


@pytest.mark.parametrize("arch", [
    # a DRESS sparsity too large for a float, and a gamma whose weights overflow
    {**json.loads(SMALL.to_json()), "extra": {"dress": {"sparsities": [10**400]}}},
    {**json.loads(SMALL.to_json()), "extra": {"dress": {"sparsities": [0.0, 0.5], "gamma": -1e308}}},
    "[" * 100000 + "]" * 100000,  # nesting deeper than the JSON decoder recurses
], ids=["huge-int-sparsity", "overflowing-gamma", "deep-nesting"])
def test_arch_values_python_cannot_hold_are_artefact_errors(arch):
    """These raised OverflowError / RecursionError out of the decoders (found by
    tests/test_fuzz_install.py)."""
    text = arch if isinstance(arch, str) else json.dumps(arch)
    with pytest.raises(ArtefactError, match="architecture"):
        decode_artefact(_with_metadata(_state(), arch=text))
    if not isinstance(arch, str):
        with pytest.raises(ArtefactError, match="architecture"):
            decode_artefact(_seed_artefact(arch))


def test_deeply_nested_safetensors_header_is_an_artefact_error():
    body = encode_full_model(ARCH, _state())[0]
    body = body[8 + int.from_bytes(body[:8], "little"):]
    deep = '{"a": ' + "[" * 100000 + "]" * 100000 + "}"
    with pytest.raises(ArtefactError, match="not JSON"):
        decode_artefact(len(deep).to_bytes(8, "little") + deep.encode() + body)


@pytest.mark.parametrize("seed", [1e400, 1.5, 7, "07", True, "-1", str(2**63), None])
def test_seed_that_is_not_an_integer_in_range_is_refused(seed):
    """``int(inf)`` raised OverflowError; ``int(1.5)`` silently used seed 1. (seed-v2 seeds are
    decimal strings: tests/shared/test_seed_artefact.py has the rest.)"""
    with pytest.raises(ArtefactError, match="seed"):
        decode_artefact(_seed_artefact(json.loads(SMALL.to_json()), seed=seed))


@pytest.mark.parametrize("body", [b"[]", b"null", b'{"arch": {}}', b"[" * 100000 + b"]" * 100000],
                         ids=["list", "null", "missing-keys", "deep-nesting"])
def test_seed_body_that_is_not_the_object_is_refused(body):
    with pytest.raises(ArtefactError, match="seed artefact"):
        decode_artefact(b"ELSEED2\n" + body)
