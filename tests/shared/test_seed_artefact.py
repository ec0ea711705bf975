"""The versioned seed encoding (model/seed-v2): what the decoder accepts and what it refuses,
each with a typed error, before anything is built (docs/seed-format.md §1)."""

from __future__ import annotations

import json

import pytest

from shared.artefacts import (
    LEGACY_SEED_ENCODING,
    SEED_MODEL_ENCODING,
    ArtefactError,
    SeedGeneratorError,
    decode_artefact,
    encode_seed_model,
    sniff_encoding,
)
from shared.models import ArchSpec, build_model, init_weights_from_seed
from shared.models.identity import model_hash

ARCH = ArchSpec("mlp", (1, 6, 6), 3, hidden=(8,))
SEED = 9


def _hash(seed: int = SEED, arch: ArchSpec = ARCH) -> str:
    return model_hash(arch, init_weights_from_seed(build_model(arch), seed).state_dict())


def _artefact(**changes) -> bytes:
    body = json.loads(encode_seed_model(ARCH, SEED, _hash())[8:])
    body.update(changes)
    return b"ELSEED2\n" + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def test_round_trip_and_exact_envelope():
    data = encode_seed_model(ARCH, SEED, _hash())
    assert data.startswith(b"ELSEED2\n") and sniff_encoding(data) == SEED_MODEL_ENCODING == "model/seed-v2"
    body = json.loads(data[8:])
    assert body == {"arch": ARCH.to_json(), "generator": "splitmix64-sha256/1", "model_hash": _hash(),
                    "seed": str(SEED)}
    assert data[8:] == json.dumps(body, sort_keys=True, separators=(",", ":")).encode()  # canonical
    decoded = decode_artefact(data)
    assert decoded.model_hash == _hash() and decoded.arch == ARCH and decoded.meta == {"seed": str(SEED)}


def test_the_largest_seed_survives_the_envelope():
    seed = 2**63 - 1
    data = encode_seed_model(ARCH, seed, _hash(seed))
    assert decode_artefact(data).model_hash == _hash(seed)
    with pytest.raises(ValueError, match="seed"):
        encode_seed_model(ARCH, 2**63, _hash())


@pytest.mark.parametrize("generator", ["splitmix64-sha256/2", "pcg64", "", None, 1])
def test_unknown_generator_is_a_typed_refusal(generator):
    with pytest.raises(SeedGeneratorError, match="generator"):
        decode_artefact(_artefact(generator=generator))


def test_generator_is_checked_before_the_architecture_is_looked_at():
    # A future generator may come with specs this client does not understand either: the
    # refusal names the generator, not a "bad spec".
    with pytest.raises(SeedGeneratorError):
        decode_artefact(_artefact(generator="splitmix64-sha256/9", arch='{"kind":"transformer"}'))


@pytest.mark.parametrize("seed", [9, "09", "-9", "+9", " 9", "9.0", "1e3", "", "9223372036854775808",
                                  "99999999999999999999", None, True, [9]])
def test_seed_that_is_not_a_canonical_decimal_string_in_range_is_refused(seed):
    with pytest.raises(ArtefactError, match="seed"):
        decode_artefact(_artefact(seed=seed))


def test_tampered_seed_is_refused_by_the_model_hash():
    with pytest.raises(ArtefactError, match="generates model"):
        decode_artefact(_artefact(seed=str(SEED + 1)))


@pytest.mark.parametrize("digest", ["0" * 64, "A" * 64, "ab", 7, None])
def test_tampered_or_malformed_model_hash_is_refused(digest):
    with pytest.raises(ArtefactError, match="model_hash|generates model"):
        decode_artefact(_artefact(model_hash=digest))


@pytest.mark.parametrize("arch", [
    json.loads(ARCH.to_json()),  # an object, as seed-v1 had it: the hashed bytes must travel verbatim
    ARCH.to_json().replace(",", ", "),  # not canonical
    ArchSpec("mlp", (36,), 3, hidden=(8,)).to_json(),  # another architecture, same tensors: hash differs
])
def test_arch_must_be_the_canonical_text_of_the_hashed_spec(arch):
    with pytest.raises(ArtefactError, match="arch|generates model"):
        decode_artefact(_artefact(arch=arch))


@pytest.mark.parametrize("body", [b"[]", b"null", b'{"arch": "x"}', b"{", b"\xff"])
def test_body_that_is_not_the_object_is_refused(body):
    with pytest.raises(ArtefactError, match="seed artefact"):
        decode_artefact(b"ELSEED2\n" + body)


def test_extra_key_is_refused():
    with pytest.raises(ArtefactError, match="must be"):
        decode_artefact(_artefact(note="hi"))


def test_seed_v1_is_refused_with_the_reason():
    """seed-v1 named numpy's PCG64 stream; its weights cannot be rebuilt any more, so it is a
    typed refusal (not a hash mismatch, not "unrecognised")."""
    v1 = b"ELSEED1\n" + json.dumps({"arch": json.loads(ARCH.to_json()), "model_hash": "0" * 64, "seed": 9},
                                   sort_keys=True, separators=(",", ":")).encode()
    assert sniff_encoding(v1) == LEGACY_SEED_ENCODING
    with pytest.raises(SeedGeneratorError, match="seed-v1.*have_model_hash"):
        decode_artefact(v1)
    with pytest.raises(SeedGeneratorError):
        decode_artefact(v1, encoding=LEGACY_SEED_ENCODING)
