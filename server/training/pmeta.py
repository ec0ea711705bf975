"""p-Meta rounds (thesis ch. 4, Alg. 4.2): meta-train the fleet's p-Meta model on few-shot tasks.

The fleet model is a ``conv4`` backbone with the ``pmeta`` family (``ArchSpec.extra["pmeta"]``:
per layer and step inner step sizes α and meta attention, all in its state dict). A round
builds N-way K-shot tasks (N = the model's ``num_classes``) from the round's labelled samples
(the classes are the labels the devices uploaded), meta-trains backbone, α and attention with
:func:`shared.pmeta.meta_train`, and validates on held-out tasks: tasks drawn from the
validation split (samples never trained on) or, with ``holdout_classes``, from classes kept
out of meta-training altogether (the thesis's novel-class test). The round metrics report
``few_shot_accuracy`` with its 95 % confidence interval (``few_shot_ci95``).

The result ships through the normal delivery, like every round: the full model, and a
``diff/sparse-v1`` diff against the deployed model when there is one (signed like every
artefact by the publish path). A first round from version 0 meta-trains from the seeded
weights of version 0 (an untrained base is no reference to beat, as in ``full``).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

import shared.codec as codec
from server.training.policy import PolicyParams, RoundInputs, RoundOutcome, UpdatePolicy
from shared.models import ArchSpec, build_model, init_weights_from_seed, model_hash

FAMILY = "pmeta"


class PMetaParams(PolicyParams):
    algorithm: Literal["pmeta_att", "pmeta", "maml", "anil", "boil", "mamlpp"] | None = Field(
        None, description="Meta-training method: p-Meta with meta attention (4.4.2 + 4.4.3, needs a spec "
        "with attention), p-Meta without attention (4.4.2), or a baseline (no attention). null: 'pmeta_att' "
        "if the fleet model has meta attention, else 'pmeta'.")
    shots: int = Field(5, ge=1, le=100, description="Support samples per class of a task (K).")
    queries: int = Field(5, ge=1, le=200, description="Query samples per class of a task.")
    meta_batch: int = Field(4, ge=1, le=256, description="Tasks per outer step.")
    iterations: int = Field(300, ge=1, le=1_000_000, description="Outer steps (Adam, cosine schedule).")
    outer_lr: float = Field(1e-3, gt=0, le=1)
    inner_lr: float = Field(0.01, gt=0, le=10, description="Fixed inner step size of maml/anil/boil (learned "
                            "methods start from the spec's init_alpha).")
    second_order: bool = Field(False, description="Second-order meta-gradients (slower; first order by default).")
    lasso_lambda: float = Field(1e-3, ge=0, le=1, description="Memory-weighted Lasso on α (Eq. 4.10).")
    seed: int = Field(0, ge=0, description="Task sampling, and the init when nothing is deployed.")
    val_tasks: int = Field(100, ge=1, le=100_000, description="Held-out tasks the round validates on.")
    holdout_classes: int = Field(0, ge=0, le=65536, description=(
        "Classes kept out of meta-training and validated on (novel classes); 0: validate on "
        "tasks of the validation split's samples."))
    min_labelled: int = Field(50, ge=1, description="Skip the round with fewer labelled samples.")
    skip_if_worse: bool = Field(True, description=(
        "Ship nothing unless the few-shot accuracy beats the deployed model's on the same tasks "
        "(a base made by 'init' is no reference)."))
    ship_diff: bool = Field(True, description="Also ship a diff/sparse-v1 diff against the deployed model.")


def _split(x: np.ndarray, y: np.ndarray, holdout: int) -> tuple[tuple[np.ndarray, np.ndarray],
                                                               tuple[np.ndarray, np.ndarray]]:
    """Meta-training and validation data, by class: the ``holdout`` largest labels are kept out."""
    classes = np.unique(y)
    if holdout >= len(classes):
        raise ValueError(f"holdout_classes={holdout} leaves no class of {len(classes)} to meta-train on")
    held = set(classes[len(classes) - holdout:].tolist())
    mask = np.isin(y, list(held))
    return (x[~mask], y[~mask]), (x[mask], y[mask])


def _usable_classes(y: np.ndarray, per_class: int) -> int:
    if len(y) == 0:
        return 0
    return int((np.bincount(y.astype(np.int64)) >= per_class).sum())


class PMetaPolicy(UpdatePolicy):
    name = "pmeta"
    Params = PMetaParams

    def train(self, inputs: RoundInputs) -> RoundOutcome:
        from shared import pmeta  # the algorithm package, imported when a round needs it

        p: PMetaParams = inputs.params
        arch: ArchSpec = inputs.arch
        if arch.extra.get(FAMILY) is None:
            raise ValueError("method 'pmeta' needs a p-Meta fleet model (model kind conv4 with the "
                             "'pmeta' family); this fleet's model has families "
                             f"{sorted(k for k, v in arch.extra.items() if v is not None) or 'none'}")
        data = inputs.data
        ways = arch.num_classes
        algorithm = p.algorithm or ("pmeta_att" if arch.extra[FAMILY].get("attention", True) else "pmeta")
        metrics: dict[str, Any] = {"labelled_samples": data.total, "ways": ways, "shots": p.shots,
                                   "queries": p.queries, "algorithm": algorithm, "variant": algorithm}
        if data.total < p.min_labelled:
            return RoundOutcome(None, metrics, skip_reason=(
                f"only {data.total} labelled samples (min_labelled={p.min_labelled})"))
        per_class = p.shots + p.queries
        if p.holdout_classes:
            x_all = np.concatenate([data.x_train, data.x_val])
            y_all = np.concatenate([data.y_train, data.y_val])
            (x_tr, y_tr), (x_va, y_va) = _split(x_all, y_all, p.holdout_classes)
        else:
            (x_tr, y_tr), (x_va, y_va) = (data.x_train, data.y_train), (data.x_val, data.y_val)
        train_classes, val_classes = _usable_classes(y_tr, per_class), _usable_classes(y_va, per_class)
        metrics.update(meta_train_classes=train_classes, val_classes=val_classes,
                       train_samples=len(y_tr), val_samples=len(y_va))
        if train_classes < ways or val_classes < ways:
            return RoundOutcome(None, metrics, skip_reason=(
                f"{ways}-way tasks with {per_class} samples per class need {ways} such classes; the "
                f"labelled data has {train_classes} for meta-training and {val_classes} for validation"))
        config = pmeta.MetaTrainConfig(
            method=algorithm, ways=ways, shots=p.shots, queries=p.queries, meta_batch=p.meta_batch,
            iterations=p.iterations, outer_lr=p.outer_lr, inner_lr=p.inner_lr,
            second_order=p.second_order, lasso_lambda=p.lasso_lambda, seed=p.seed)
        train_sampler = pmeta.TaskSampler(x_tr, y_tr, ways=ways, shots=p.shots, queries=p.queries, seed=p.seed)
        model = build_model(arch)
        if inputs.base_state is not None:
            model.load_state_dict(inputs.base_state)
        else:
            init_weights_from_seed(model, p.seed)
        base_acc = None
        # An untrained base (version 0: seeded weights) is no reference to beat.
        if inputs.base_state is not None and inputs.base_method not in (None, "init", "reinit"):
            base_acc = pmeta.evaluate_tasks(model, self._val_sampler(pmeta, x_va, y_va, p, ways), config,
                                            p.val_tasks)
            metrics.update(base_few_shot_accuracy=float(base_acc["accuracy"]),
                           base_few_shot_ci95=float(base_acc["ci95"]))

        def progress(step: int, values: dict[str, float]) -> None:  # meta_train: after outer step `step`
            inputs.progress(step + 1, p.iterations, dict(values))

        train_metrics = pmeta.meta_train(model, train_sampler, config, progress=progress)
        metrics.update({f"meta_{k}": v for k, v in train_metrics.items()})
        evaluation = pmeta.evaluate_tasks(model, self._val_sampler(pmeta, x_va, y_va, p, ways), config,
                                          p.val_tasks)
        acc, ci = float(evaluation["accuracy"]), float(evaluation["ci95"])
        metrics.update(few_shot_accuracy=acc, few_shot_ci95=ci, val_tasks=p.val_tasks,
                       val_accuracy=acc, base_val_accuracy=metrics.get("base_few_shot_accuracy"))
        if p.skip_if_worse and base_acc is not None and acc <= float(base_acc["accuracy"]):
            return RoundOutcome(None, metrics, skip_reason=(
                f"few-shot accuracy {acc:.4f} does not beat the deployed model's "
                f"{float(base_acc['accuracy']):.4f} on the same tasks"))
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if not (p.ship_diff and inputs.base_state is not None and inputs.base_hash):
            return RoundOutcome(state, metrics)
        update = codec.make_update(inputs.base_state, state, value_format="fp32", arch=arch)
        base_hash = model_hash(arch, inputs.base_state)
        diff = codec.encode_update(update, base_hash)
        metrics["diff_bytes"] = len(diff)
        return RoundOutcome(update.target, metrics, diff=diff, diff_encoding=codec.DIFF_ENCODING,
                            diff_base_hash=base_hash)

    @staticmethod
    def _val_sampler(pmeta: Any, x: np.ndarray, y: np.ndarray, p: PMetaParams, ways: int) -> Any:
        # A fixed seed apart from training's: base and new model are scored on the same tasks.
        return pmeta.TaskSampler(x, y, ways=ways, shots=p.shots, queries=p.queries, seed=p.seed + 1_000_003)
