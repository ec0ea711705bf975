"""Model families plug into ArchSpec, build_model, seeded init and artefacts through the
registry, without shared.models naming any of them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib import metadata
from typing import Any

import pytest
import torch
from torch import nn

from shared.artefacts import ArtefactError, decode_artefact, encode_full_model
from shared.dress.family import FAMILY as DRESS
from shared.dress.model_state import plain_arch
from shared.dress.objective import DressObjective
from shared.models import (
    ArchSpec,
    FamilyError,
    ModelFamily,
    UnknownFamilyError,
    build_model,
    families_of,
    get_family,
    inference_engine,
    init_weights_from_seed,
    installed_families,
    model_hash,
    register_family,
)
from shared.models.seedgen import uniform
from shared.objectives import CrossEntropyObjective, objective_for
from shared.tensors import tensors_hash


class ToySectionError(ValueError):
    pass


class _Holder(nn.Module):
    pass


class ToyFamily(ModelFamily[int]):
    """A third family: one ``toy.scale`` buffer of ``width`` values drawn from the seed."""

    name = "toy"

    def parse(self, section: Any) -> int:
        if not isinstance(section, dict) or set(section) != {"width"}:
            raise ToySectionError('extra["toy"] must be {"width": n}')
        width = section["width"]
        if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= 64:
            raise ToySectionError(f'extra["toy"]["width"] must be an int in [1, 64], got {width!r}')
        return width

    def attach(self, model: nn.Module, arch: ArchSpec, spec: int) -> nn.Module:
        holder = _Holder()
        holder.register_buffer("scale", torch.full((spec,), float("nan")))
        model.add_module(self.name, holder)
        return model

    @torch.no_grad()
    def init_from_seed(self, model: nn.Module, spec: int, seed: int) -> None:
        # the family contract: random values from the documented generator, under the tensor's name
        model.toy.scale.copy_(torch.from_numpy(uniform(seed, "toy.scale", spec, fan_in=1)))


TOY = register_family(ToyFamily())
BACKBONE = ArchSpec("mlp", (1, 8, 8), 10, hidden=(16,))
ARCH = ArchSpec("mlp", (1, 8, 8), 10, hidden=(16,), extra={"toy": {"width": 3}})


def _seeded(arch: ArchSpec, seed: int) -> dict[str, torch.Tensor]:
    return init_weights_from_seed(build_model(arch), seed).state_dict()


def test_section_is_validated_by_its_family() -> None:
    assert families_of(ARCH) == [(TOY, 3)]
    assert families_of(BACKBONE) == []
    for bad, message in (({"width": 0}, "width"), ({"width": "3"}, "width"), ([3], "must be")):
        with pytest.raises(ToySectionError, match=message):
            ArchSpec("mlp", (4,), 2, extra={"toy": bad})
        with pytest.raises(ToySectionError, match=message):  # as a spec arrives in an artefact
            ArchSpec.from_json(json.dumps({"kind": "mlp", "input_shape": [4], "num_classes": 2,
                                           "extra": {"toy": bad}}))


def test_attach_adds_the_family_buffer_to_the_backbone() -> None:
    model = build_model(ARCH)
    state = model.state_dict()
    plain = build_model(BACKBONE).state_dict()
    assert set(state) == set(plain) | {"toy.scale"}
    assert state["toy.scale"].shape == (3,)
    assert model.arch_spec == ARCH
    x = torch.rand(2, 1, 8, 8)
    assert model(x).shape == (2, 10)  # the backbone's forward


def test_seeded_init_is_deterministic_and_leaves_the_family_its_tensors() -> None:
    a, b, c = _seeded(ARCH, 5), _seeded(ARCH, 5), _seeded(ARCH, 6)
    assert tensors_hash(a) == tensors_hash(b) and tensors_hash(a) != tensors_hash(c)
    expected = uniform(5, "toy.scale", 3, fan_in=1)
    assert torch.equal(a["toy.scale"], torch.from_numpy(expected))  # the family's init, not the generic one
    backbone = _seeded(BACKBONE, 5)
    assert all(torch.equal(a[k], v) for k, v in backbone.items())  # the family does not disturb it


def test_family_model_round_trips_through_an_artefact() -> None:
    state = _seeded(ARCH, 2)
    data, digest = encode_full_model(ARCH, state)
    decoded = decode_artefact(data)
    assert decoded.arch == ARCH and decoded.model_hash == digest == model_hash(ARCH, state)
    assert all(torch.equal(decoded.state[k], v) for k, v in state.items())
    # The artefact's tensors are checked against the spec, family buffers included.
    short = {**state, "toy.scale": torch.zeros(2)}
    with pytest.raises(ArtefactError, match="do not fit"):
        decode_artefact(encode_full_model(ARCH, short)[0])


def test_unknown_family_names_the_installed_ones() -> None:
    with pytest.raises(UnknownFamilyError, match=r"unknown model family 'nope'.*installed families: \[.*'dress'.*'toy'"):
        ArchSpec("mlp", (4,), 2, extra={"nope": {}})
    assert {"dress", "toy"} <= set(installed_families())
    assert isinstance(UnknownFamilyError("x"), ValueError)  # ArchSpec errors stay ValueErrors


def test_a_broken_plugin_is_named(monkeypatch) -> None:
    import shared.models.families as registry

    group = registry.ENTRY_POINT_GROUP
    eps = {"broken": metadata.EntryPoint("broken", "no_such_module_for_edgeloop:FAMILY", group),
           "wrong": metadata.EntryPoint("wrong", "shared.dress.family:FAMILY", group)}
    monkeypatch.setattr(registry, "_entry_points", lambda: eps)
    with pytest.raises(FamilyError, match=r"'broken' \(no_such_module_for_edgeloop:FAMILY\) failed to load"):
        ArchSpec("mlp", (4,), 2, extra={"broken": {}})
    with pytest.raises(FamilyError, match="is not a ModelFamily named 'wrong'"):
        ArchSpec("mlp", (4,), 2, extra={"wrong": {}})


def test_registration_refuses_a_second_family_under_a_taken_name() -> None:
    assert register_family(TOY) is TOY  # the same object again: a no-op
    with pytest.raises(FamilyError, match="already registered"):
        register_family(ToyFamily())
    with pytest.raises(FamilyError, match="lower-case name"):
        register_family(object())  # type: ignore[arg-type]


def test_families_combine_in_one_spec() -> None:
    arch = ArchSpec("mlp", (1, 8, 8), 10, hidden=(16,), extra={"dress": {"sparsities": [0.5, 0.9]}, "toy": {"width": 2}})
    state = _seeded(arch, 1)
    assert "toy.scale" in state and "dress.counts" in state
    assert isinstance(objective_for(arch), DressObjective)  # toy offers no objective
    assert inference_engine(arch, state) is None  # untrained DRESS runs densely; toy has no engine


def test_objective_follows_the_family() -> None:
    assert isinstance(objective_for(BACKBONE), CrossEntropyObjective)
    assert isinstance(objective_for(ARCH), CrossEntropyObjective)
    dress = ArchSpec("mlp", (1, 8, 8), 10, hidden=(16,), extra={"dress": {"sparsities": [0.5, 0.9]}})
    assert isinstance(objective_for(dress), DressObjective)


def test_dress_is_found_through_its_entry_point() -> None:
    assert get_family("dress") is DRESS
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="edgeloop.model_families")}
    assert eps.get("dress") == "shared.dress.family:FAMILY"


def test_dress_loads_lazily_on_first_use() -> None:
    # A fresh interpreter: shared.models alone imports no family; naming one loads it.
    code = textwrap.dedent("""
        import sys
        from shared.models import ArchSpec
        assert not any(m.startswith("shared.dress") for m in sys.modules), "dress imported early"
        ArchSpec("mlp", (4,), 2, extra={"dress": {"sparsities": [0.5]}})
        assert "shared.dress.family" in sys.modules
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_dress_seeded_state_is_the_backbone_plus_constant_buffers() -> None:
    # DRESS's init_from_seed: all-zero allocation, per-subnet norms like fresh norm layers,
    # and a backbone bit-identical to the plain model's (model hashes of existing DRESS
    # models depend on this).
    arch = ArchSpec("cnn", (1, 8, 8), 10, hidden=(8,), channels=(4,), extra={"dress": {"sparsities": [0.5, 0.9]}})
    state, backbone = _seeded(arch, 3), _seeded(plain_arch(arch), 3)
    assert all(torch.equal(state[k], v) for k, v in backbone.items())
    assert int(state["dress.counts"].abs().sum()) == 0
    norms = {k: v for k, v in state.items() if k.startswith("dress.norm.")}
    assert norms
    for k, v in norms.items():
        ones = k.endswith((".weight", ".running_var"))
        assert torch.equal(v, torch.ones_like(v) if ones else torch.zeros_like(v)), k
