"""Architecture specs, model construction and seeded, machine-independent initialisation."""

from __future__ import annotations

import json

import pytest
import torch

from shared.models import ArchSpec, build_model, default_spec, init_weights_from_seed
from shared.tensors import tensors_hash


@pytest.mark.parametrize(
    "spec",
    [
        ArchSpec("mlp", (1, 28, 28), 10),
        ArchSpec("mlp", (64,), 3, hidden=()),
        ArchSpec("cnn", (3, 16, 12), 7, hidden=(32,), channels=(8, 16), extra={"dress": {"sparsities": [0.5, 0.9]}}),
        default_spec("cnn", (1, 28, 28), 10),
    ],
)
def test_spec_json_round_trip(spec):
    text = spec.to_json()
    back = ArchSpec.from_json(text)
    assert back == spec
    assert back.to_json() == text
    assert json.loads(text)["kind"] == spec.kind
    # Canonical: key order in the input does not matter.
    shuffled = json.dumps(dict(reversed(list(json.loads(text).items()))))
    assert ArchSpec.from_json(shuffled).to_json() == text


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="rnn", input_shape=(4,), num_classes=2), "unknown model kind"),
        (dict(kind="mlp", input_shape=(), num_classes=2), "input_shape"),
        (dict(kind="mlp", input_shape=(1, 2, 3, 4), num_classes=2), "input_shape"),
        (dict(kind="mlp", input_shape=(0, 5), num_classes=2), "input_shape"),
        (dict(kind="mlp", input_shape=(5,), num_classes=1), "num_classes"),
        (dict(kind="mlp", input_shape=(5,), num_classes=70000), "num_classes"),
        (dict(kind="mlp", input_shape=(5,), num_classes=3, hidden=(8, 0)), "hidden"),
        (dict(kind="cnn", input_shape=(28, 28), num_classes=3, channels=(4,)), r"\(C, H, W\)"),
        (dict(kind="cnn", input_shape=(1, 28, 28), num_classes=3), "channels"),
        (dict(kind="cnn", input_shape=(1, 28, 28), num_classes=3, channels=(4,) * 5), "shrink"),
        (dict(kind="cnn", input_shape=(1, 28, 28), num_classes=3, channels=(4, -1)), "channels"),
    ],
)
def test_invalid_specs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ArchSpec(**kwargs)
    # The same through JSON, as a spec arrives in an artefact.
    with pytest.raises(ValueError, match=message):
        ArchSpec.from_json(json.dumps(kwargs))


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"kind": "mlp", "input_shape": [4], "num_classes": 2, "dropout": 0.5}', "unknown keys"),
        ('{"kind": "mlp", "input_shape": [4]}', "incomplete"),
        ('["mlp"]', "JSON object"),
        ("{not json", "not valid JSON"),
        ('{"kind": "mlp", "input_shape": [4], "num_classes": 2.5}', "num_classes"),
        ('{"kind": "mlp", "input_shape": [4], "num_classes": "10"}', "num_classes"),
        ('{"kind": "mlp", "input_shape": [4], "num_classes": 3, "hidden": "512"}', "hidden"),
        ('{"kind": "mlp", "input_shape": 784, "num_classes": 3}', "input_shape"),
        ('{"kind": "mlp", "input_shape": [28.5], "num_classes": 3}', "input_shape"),
    ],
)
def test_bad_spec_json_is_refused(text, message):
    with pytest.raises(ValueError, match=message):
        ArchSpec.from_json(text)


def test_default_spec_kinds():
    assert default_spec("mlp", (1, 28, 28), 10).hidden == (512, 512)  # the thesis's DPU MLP
    with pytest.raises(ValueError, match="unknown model kind"):
        default_spec("vit", (1, 28, 28), 10)


@pytest.mark.parametrize(
    "spec",
    [
        ArchSpec("mlp", (1, 28, 28), 10, hidden=(32, 16)),
        ArchSpec("mlp", (20,), 4, hidden=()),
        ArchSpec("cnn", (1, 28, 28), 10, hidden=(16,), channels=(4, 8)),
        ArchSpec("cnn", (3, 16, 12), 5, hidden=(), channels=(4, 4, 4)),
    ],
)
def test_forward_shapes(spec):
    model = build_model(spec).eval()
    x = torch.rand(3, *spec.input_shape)
    out = model(x)
    assert out.shape == (3, spec.num_classes)
    assert torch.isfinite(out).all()


def _state(spec: ArchSpec, seed: int) -> dict[str, torch.Tensor]:
    return init_weights_from_seed(build_model(spec), seed).state_dict()


CNN = ArchSpec("cnn", (1, 12, 12), 10, hidden=(8,), channels=(4,))


@pytest.mark.parametrize("spec", [ArchSpec("mlp", (1, 8, 8), 10, hidden=(16, 16)), CNN])
def test_seeded_init_is_reproducible_and_seed_dependent(spec):
    a, b = _state(spec, 7), _state(spec, 7)
    assert tensors_hash(a) == tensors_hash(b)
    for k in a:
        assert torch.equal(a[k], b[k])
    c = _state(spec, 8)
    assert tensors_hash(c) != tensors_hash(a)
    # Every float tensor except the norm-layer constants differs between seeds.
    differ = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], c[k])]
    assert differ and all("weight" in k or "bias" in k for k in differ)


def test_seeded_init_follows_torch_default_bounds_and_norm_constants():
    state = _state(CNN, 3)
    w = state["classifier.1.weight"]  # Linear(4*6*6 -> 8)
    bound = 1 / (4 * 6 * 6) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert abs(float(w.mean())) < bound / 5  # centred
    conv = state["features.0.weight"]  # Conv(1 -> 4, 3x3): fan_in 9
    assert conv.abs().max() <= 1 / 3
    bn = {k: v for k, v in state.items() if k.startswith("features.1.")}
    assert torch.equal(bn["features.1.weight"], torch.ones(4))
    assert torch.equal(bn["features.1.bias"], torch.zeros(4))
    assert torch.equal(bn["features.1.running_mean"], torch.zeros(4))
    assert torch.equal(bn["features.1.running_var"], torch.ones(4))
    assert int(bn["features.1.num_batches_tracked"]) == 0


def test_adding_a_layer_keeps_earlier_layers_values():
    small = _state(ArchSpec("mlp", (1, 8, 8), 10, hidden=(16,)), 11)
    big = _state(ArchSpec("mlp", (1, 8, 8), 10, hidden=(16, 32)), 11)
    assert torch.equal(small["net.1.weight"], big["net.1.weight"])
    assert torch.equal(small["net.1.bias"], big["net.1.bias"])


def test_init_overwrites_whatever_torch_put_there():
    spec = ArchSpec("mlp", (6,), 3, hidden=(5,))
    torch.manual_seed(0)
    a = init_weights_from_seed(build_model(spec), 1).state_dict()
    torch.manual_seed(123)
    b = init_weights_from_seed(build_model(spec), 1).state_dict()
    assert tensors_hash(a) == tensors_hash(b)


def test_init_seed_range():
    model = build_model(ArchSpec("mlp", (4,), 2, hidden=()))
    init_weights_from_seed(model, 2**63 - 1)
    for bad in (-1, 2**63):
        with pytest.raises(ValueError, match="seed"):
            init_weights_from_seed(model, bad)
