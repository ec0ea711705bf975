"""Personal models: the personal/v1 format refuses every kind of damage with
PersonalFormatError, and the head fine-tuning learner adapts a real model to a device's own
(relabelled) world on real digits, leaving the backbone bit-identical."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from shared.models import ArchSpec, build_model, init_weights_from_seed
from shared.personal import (
    HeadFinetuneConfig,
    HeadFinetuneLearner,
    LearnerConfig,
    LearnerError,
    LearnerRefused,
    PersonalDelta,
    PersonalFormatError,
    decode_personal,
    encode_personal,
    make_learner,
)
from shared.personal.format import personal_hash
from shared.tensors import tensors_hash
from shared.training import TrainConfig, accuracy, train_supervised

ARCH = ArchSpec("mlp", (1, 8, 8), 10, hidden=(32,))
BASE_HASH = "ab" * 32
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def base(digits):
    """A base MLP trained on the fleet's world (digits as labelled)."""
    torch.manual_seed(0)
    model = init_weights_from_seed(build_model(ARCH), 0)
    train_supervised(model, digits.x_train, digits.y_train, TrainConfig(epochs=8, lr=3e-3))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _delta(seed: int = 0) -> PersonalDelta:
    g = torch.Generator().manual_seed(seed)
    return PersonalDelta({"net.3.weight": torch.randn(10, 32, generator=g),
                          "net.3.bias": torch.randn(10, generator=g)},
                         meta={"head": "net.3", "train_loss": 0.25})


def _encode(delta: PersonalDelta | None = None, **kw) -> tuple[bytes, str]:
    args = {"base_hash": BASE_HASH, "learner": "head", "config": HeadFinetuneConfig().to_dict(),
            "samples": 123, "delta": delta or _delta()}
    args.update(kw)
    return encode_personal(**args)


def _split(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _with_meta(data: bytes, **changes: str) -> bytes:
    """The same tensors, saved again with edited ``edgeloop.*`` metadata (hash left alone)."""
    from safetensors.torch import load

    header, _ = _split(data)
    meta = dict(header["__metadata__"])
    for k, v in changes.items():
        meta["edgeloop." + k] = v
    return st_save(load(data), metadata=meta)


# --- format -----------------------------------------------------------------------------


def test_round_trip_is_exact_and_hash_is_documented():
    delta = _delta()
    data, digest = _encode(delta)
    out = decode_personal(data, base_hash=BASE_HASH, learner="head")
    assert out.personal_hash == digest and out.base_hash == BASE_HASH and out.learner == "head"
    assert out.samples == 123 and out.config == HeadFinetuneConfig().to_dict()
    assert out.delta.meta == delta.meta and out.delta.arch is None
    assert out.delta.tensors.keys() == delta.tensors.keys()
    for k, t in delta.tensors.items():
        assert torch.equal(out.delta.tensors[k], t)
    meta = _split(data)[0]["__metadata__"]
    assert meta["edgeloop.delta_hash"] == tensors_hash(delta.tensors)
    assert personal_hash(meta) == digest == meta["edgeloop.personal_hash"]
    # The hash does not depend on the order safetensors writes the metadata in.
    assert _encode(_delta())[1] == digest


def test_a_changed_architecture_travels_with_the_delta():
    arch = ArchSpec("mlp", (1, 8, 8), 12, hidden=(32,))  # p-Meta-style: two new classes
    delta = PersonalDelta({"net.3.weight": torch.zeros(12, 32), "net.3.bias": torch.zeros(12)},
                          arch=arch)
    out = decode_personal(_encode(delta)[0])
    assert out.delta.arch == arch


def test_every_flipped_byte_is_refused():
    data, _ = _encode()
    decode_personal(data)
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x01
        with pytest.raises(PersonalFormatError):
            decode_personal(bytes(bad))


def test_truncation_and_foreign_bytes_are_refused():
    data, _ = _encode()
    for cut in (0, 5, 8, 100, len(data) - 1):
        with pytest.raises(PersonalFormatError):
            decode_personal(data[:cut])
    full = st_save({"w": torch.zeros(2)}, metadata={"edgeloop.encoding": "model/safetensors-v1"})
    with pytest.raises(PersonalFormatError, match="encoding"):
        decode_personal(full)


def test_wrong_base_or_learner_is_refused():
    data, _ = _encode()
    with pytest.raises(PersonalFormatError, match="base"):
        decode_personal(data, base_hash="cd" * 32)
    with pytest.raises(PersonalFormatError, match="learner"):
        decode_personal(data, learner="pmeta")


@pytest.mark.parametrize("key, value", [
    ("base_hash", "cd" * 32),  # moved to another base without re-deriving
    ("samples", "124"),
    ("learner_config", json.dumps({"epochs": 50})),
    ("meta", "{}"),
    ("arch", ARCH.to_json()),
    ("learner", "pmeta"),
])
def test_edited_metadata_is_refused(key, value):
    data, _ = _encode()
    with pytest.raises(PersonalFormatError, match="personal hash mismatch"):
        decode_personal(_with_meta(data, **{key: value}))


def test_edited_tensors_with_a_fixed_up_personal_hash_are_refused():
    """Re-hashing the metadata does not help: the delta hash is checked against the tensors."""
    from safetensors.torch import load

    data, _ = _encode()
    header, _ = _split(data)
    tensors = load(data)
    tensors["net.3.bias"] = tensors["net.3.bias"] + 1
    forged = st_save(tensors, metadata=header["__metadata__"])
    with pytest.raises(PersonalFormatError, match="delta hash mismatch"):
        decode_personal(forged)


@pytest.mark.parametrize("key, value, message", [
    ("samples", "\u0663", "samples"),  # ARABIC-INDIC DIGIT THREE: str.isdigit() says yes
    ("samples", "12\n", "samples"),
    ("base_hash", BASE_HASH + "\n", "malformed base hash"),
    ("learner", "head\n", "malformed base hash or learner"),
])
def test_malformed_metadata_with_a_fixed_up_hash_is_refused(key, value, message):
    """A file whose hashes are consistent but whose entries are not what the format allows."""
    from safetensors.torch import load

    data, _ = _encode()
    meta = dict(_split(data)[0]["__metadata__"], **{"edgeloop." + key: value})
    meta["edgeloop.personal_hash"] = personal_hash(meta)
    with pytest.raises(PersonalFormatError, match=message):
        decode_personal(st_save(load(data), metadata=meta))


def test_extra_or_missing_metadata_is_refused():
    data, _ = _encode()
    header, _ = _split(data)
    from safetensors.torch import load

    meta = dict(header["__metadata__"], **{"edgeloop.share": "yes"})
    meta["edgeloop.personal_hash"] = personal_hash(meta)
    with pytest.raises(PersonalFormatError, match="unexpected"):
        decode_personal(st_save(load(data), metadata=meta))
    meta = dict(header["__metadata__"])
    del meta["edgeloop.samples"]
    meta["edgeloop.personal_hash"] = personal_hash(meta)
    with pytest.raises(PersonalFormatError, match="missing"):
        decode_personal(st_save(load(data), metadata=meta))


def test_encoder_validates_its_inputs():
    with pytest.raises(PersonalFormatError):
        _encode(base_hash="AB" * 32)
    with pytest.raises(PersonalFormatError):
        _encode(base_hash=BASE_HASH + "\n")  # a regex "$" would let the newline through
    with pytest.raises(PersonalFormatError):
        _encode(learner="Head!")
    with pytest.raises(PersonalFormatError):
        _encode(learner="head\n")  # learner names name files on the device
    with pytest.raises(PersonalFormatError):
        _encode(samples=-1)
    with pytest.raises(PersonalFormatError, match="JSON"):
        _encode(delta=PersonalDelta({"w": torch.zeros(1)}, meta={"x": float("nan")}))


# --- config and registry ------------------------------------------------------------------


def test_config_is_typed_and_validated():
    assert HeadFinetuneConfig.from_dict({"epochs": 3, "lr": 1}).lr == 1.0
    for bad in ({"epochs": "3"}, {"epochs": 2.5}, {"epochs": True}, {"epochs": 0},
                {"lr": float("inf")}, {"lr": 0}, {"batch_size": 0}, {"unknown": 1}):
        with pytest.raises(LearnerError):
            HeadFinetuneConfig.from_dict(bad)
    assert isinstance(make_learner("head"), HeadFinetuneLearner)
    with pytest.raises(LearnerError, match="unknown learner"):
        make_learner("nope")


@dataclass(frozen=True)
class _BudgetConfig(LearnerConfig):
    """The shape a p-Meta / DA³ config takes: an optional memory budget."""

    memory_budget_mb: float | None = None
    steps: int = 5


def test_optional_config_fields_accept_none_or_their_type():
    assert _BudgetConfig.from_dict({}).memory_budget_mb is None
    assert _BudgetConfig.from_dict({"memory_budget_mb": 3}).memory_budget_mb == 3.0
    assert _BudgetConfig.from_dict({"memory_budget_mb": None, "steps": 2}).to_dict() == {
        "memory_budget_mb": None, "steps": 2}
    with pytest.raises(LearnerError):
        _BudgetConfig.from_dict({"memory_budget_mb": "3"})


# --- the head learner ---------------------------------------------------------------------


def _shifted(ds, perm: np.ndarray):
    """The device's world: the same images, but its users name the classes differently."""
    return ds.x_train, perm[ds.y_train], ds.x_test, perm[ds.y_test]


def test_head_finetune_recovers_a_relabelled_world(digits, base):
    perm = np.roll(np.arange(10), 3)
    x_tr, y_tr, x_te, y_te = _shifted(digits, perm)
    learner = HeadFinetuneLearner()
    cfg = HeadFinetuneConfig(epochs=20, lr=1e-2)
    delta = learner.adapt(ARCH, base, x_tr, y_tr, cfg)
    assert set(delta.tensors) == {"net.3.weight", "net.3.bias"}
    served = learner.apply(ARCH, base, delta)

    base_model = build_model(ARCH)
    base_model.load_state_dict(base)
    personal = build_model(ARCH)
    personal.load_state_dict(served)
    base_fleet_acc = accuracy(base_model, digits.x_test, digits.y_test)
    base_acc = accuracy(base_model, x_te, y_te)
    personal_acc = accuracy(personal, x_te, y_te)
    # The relabelling is linear in the head's inputs, so tuning the head alone recovers most
    # of what the base knew about the images; the base itself is wrong on this world.
    assert personal_acc > base_acc
    assert personal_acc >= 0.9 * base_fleet_acc
    for name, t in base.items():  # frozen: everything but the head is the base, bit for bit
        if name not in delta.tensors:
            assert served[name] is t or torch.equal(served[name], t)


def test_head_finetune_keeps_batchnorm_statistics_frozen(digits):
    arch = ArchSpec("cnn", (1, 8, 8), 10, hidden=(16,), channels=(4,))
    state = init_weights_from_seed(build_model(arch), 1).state_dict()
    delta = HeadFinetuneLearner().adapt(arch, state, digits.x_train[:97], digits.y_train[:97],
                                        HeadFinetuneConfig(epochs=1, batch_size=32))
    assert set(delta.tensors) == {"classifier.4.weight", "classifier.4.bias"}
    served = HeadFinetuneLearner().apply(arch, state, delta)
    assert all(torch.equal(served[k], state[k]) for k in state if "running" in k)


def test_head_finetune_refuses_a_dress_model(digits):
    """A DRESS head is pruned per subnet: tuning it densely is left to the families."""
    dress = ArchSpec("mlp", (1, 8, 8), 10, hidden=(32,),
                     extra={"dress": {"sparsities": [0.5, 0.9], "gamma": 0.5}})
    with pytest.raises(LearnerRefused, match="plain models"):
        HeadFinetuneLearner().adapt(dress, {}, digits.x_train[:20], digits.y_train[:20],
                                    HeadFinetuneConfig())


def test_head_finetune_refuses_bad_data(digits, base):
    learner = HeadFinetuneLearner()
    with pytest.raises(LearnerError, match="labels"):
        learner.adapt(ARCH, base, digits.x_train[:20], digits.y_train[:20] + 10,
                      HeadFinetuneConfig())
    with pytest.raises(LearnerError, match="inputs"):
        learner.adapt(ARCH, base, np.zeros((4, 1, 9, 9), np.uint8), np.zeros(4, np.int64),
                      HeadFinetuneConfig())
    with pytest.raises(LearnerError, match="fit"):  # a delta that does not fit the arch
        learner.apply(ARCH, base, PersonalDelta({"net.3.weight": torch.zeros(3, 3)}))
