"""The ``da3`` round: one cohort (a domain, e.g. a tag) gets its own DA³ adaptor.

The cohort's current model is the base. It must be a ``resnet``: the plain fleet backbone, or
an earlier adaptation of it (the adaptor then starts from that one). The backbone stays frozen
(``shared.da3.train_domain`` trains only the adaptor and head tensors; this module checks the
backbone is bit-identical afterwards and fails the round otherwise), and the version it ships
is the adapted model, whose delivery artefact is ``da3/adaptor-v1`` against the base
(shared/da3/artefact.py): a device of the cohort downloads the adaptor, not the model. The
worker publishes the adapted architecture (``RoundOutcome.arch``), signs every artefact it
stores (``server.domain.versions.add_artefact``) and retargets only the round's cohort.

A later round of the backbone's own lineage (``dpu``/``full`` for ``all``) retargets the
cohort to the new backbone; its adaptor is re-adapted by the cohort's next ``da3`` round.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from pydantic import Field
from sqlalchemy.orm import Session

from server.db.models import ModelVersion
from server.training.policy import PolicyParams, RoundInputs, RoundOutcome, UpdatePolicy
from shared.artefacts import decode_artefact
from shared.da3.artefact import (
    ADAPTOR_ENCODING,
    FAMILY,
    adaptor_names,
    backbone_spec,
    encode_adaptor,
)
from shared.models import build_model, init_weights_from_seed
from shared.training import accuracy


def backbone_version(session: Session, mv: ModelVersion) -> ModelVersion:
    """The version other methods build on for a cohort that runs an adapted model: its nearest
    ancestor without a DA³ section (the fleet backbone), or ``mv`` itself if it has none."""
    current: ModelVersion | None = mv
    for _ in range(64):  # adaptations of adaptations: bounded, a parent chain never loops
        if current is None or FAMILY not in json.loads(current.arch_json).get("extra", {}):
            break
        current = session.get(ModelVersion, current.parent_hash) if current.parent_hash else None
    return current or mv


class DA3RoundError(ValueError):
    """The cohort's model cannot be adapted by a da3 round (not a resnet, nothing deployed)."""


class DA3Params(PolicyParams):
    epochs: int = Field(5, ge=1, le=1000, description="Passes over the cohort's labelled training split.")
    batch_size: int = Field(32, ge=1, le=4096)
    lr: float = Field(1e-3, gt=0, le=10)
    seed: int = Field(0, ge=0, description="Adaptor init and minibatch order.")
    gate: bool = Field(True, description="The dynamic spatial gate (False: dense adaptor).")
    temperature: float = Field(2.0 / 3.0, gt=0, le=100, description="Gumbel-Sigmoid temperature T.")
    skip_if_worse: bool = Field(True, description="Ship nothing unless validation accuracy beats the base's.")
    min_labelled: int = Field(20, ge=1, description="Skip the round with fewer labelled samples.")


class DA3Policy(UpdatePolicy):
    name = "da3"
    Params = DA3Params

    def train(self, inputs: RoundInputs) -> RoundOutcome:
        from shared.da3 import DA3TrainConfig, da3_spec, evaluate_domain, train_domain

        p: DA3Params = inputs.params
        data = inputs.data
        base_arch = inputs.base_arch or inputs.arch
        if inputs.base_state is None or inputs.base_hash is None:
            raise DA3RoundError("a da3 round adapts the cohort's current model; none is deployed")
        if base_arch.kind != "resnet":
            raise DA3RoundError(f"a da3 round needs a resnet-kind base model (a frozen residual "
                                f"backbone); the cohort runs a {base_arch.kind!r} model")
        others = sorted(k for k in base_arch.extra if k != FAMILY)
        if others:
            raise DA3RoundError(f"a da3 round cannot adapt a model of the families {others}")
        if data.total < p.min_labelled:
            return RoundOutcome(None, {"labelled_samples": data.total},
                                skip_reason=f"only {data.total} labelled samples (min_labelled={p.min_labelled})")
        arch = da3_spec(backbone_spec(base_arch), gate=p.gate, temperature=p.temperature)
        model = build_model(arch)
        init_weights_from_seed(model, p.seed)  # adaptor init; every base tensor is loaded next
        own = model.state_dict()
        warm = base_arch.extra.get(FAMILY) == arch.extra[FAMILY]  # same adaptor: start from it
        names = set(adaptor_names(arch))
        # Backbone and head from the base; the base's adaptor tensors only if it is this adaptor.
        load = {k: v for k, v in inputs.base_state.items()
                if k in own and own[k].shape == v.shape and (warm or not k.startswith(FAMILY + "."))}
        missing = sorted(k for k in own if k not in names and k not in load)
        if missing:
            raise DA3RoundError(f"the base model lacks backbone tensors {missing[:4]}")
        model.load_state_dict(load, strict=False)
        backbone = {k: v.detach().clone() for k, v in model.state_dict().items() if k not in names}
        base_model = build_model(base_arch)
        base_model.load_state_dict(inputs.base_state)
        has_val = len(data.y_val) > 0
        base_acc = accuracy(base_model, data.x_val, data.y_val) if has_val else None  # a plain model too
        config = DA3TrainConfig(method="da3", epochs=p.epochs, lr=p.lr, batch=p.batch_size,
                                temperature=p.temperature, seed=p.seed)
        stats = train_domain(model, data.x_train, data.y_train, config)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        moved = sorted(k for k, v in backbone.items() if not torch.equal(v, state[k]))
        if moved:  # the method's promise, checked: a moved backbone would not be the fleet's
            raise DA3RoundError(f"training changed frozen backbone tensors {moved[:4]}")
        metrics: dict[str, Any] = {
            "labelled_samples": data.total, "train_samples": len(data.y_train),
            "val_samples": len(data.y_val), "base_val_accuracy": base_acc,
            "adaptor_tensors": len(names),
            "adaptor_params": sum(state[k].numel() for k in names),
            **{f"train_{k}": float(v) for k, v in stats.items() if isinstance(v, (int, float))},
        }
        val_acc = None
        if has_val:
            ev = evaluate_domain(model, data.x_val, data.y_val)
            val_acc = float(ev["accuracy"])
            metrics.update(gate_sparsity=float(ev.get("gate_sparsity", 0.0)),
                           flops=float(ev.get("flops", 0.0)), flops_dense=float(ev.get("flops_dense", 0.0)))
        metrics["val_accuracy"] = val_acc
        if p.skip_if_worse and base_acc is not None and val_acc is not None and val_acc <= base_acc:
            return RoundOutcome(None, metrics, skip_reason=(
                f"validation accuracy {val_acc:.4f} does not beat the base model's {base_acc:.4f}"))
        data_bytes, digest = encode_adaptor(arch, state, inputs.base_hash)
        # Decoded here exactly as a device will (like seed artefacts): never publish one that fails.
        decoded = decode_artefact(data_bytes, inputs.base_state, base_arch=base_arch,
                                  encoding=ADAPTOR_ENCODING)
        if decoded.model_hash != digest:
            raise DA3RoundError("the adaptor artefact does not reproduce the adapted model")
        metrics["adaptor_bytes"] = len(data_bytes)
        return RoundOutcome(state, metrics, diff=data_bytes, diff_encoding=ADAPTOR_ENCODING,
                            diff_base_hash=inputs.base_hash, arch=arch)
