"""Full updating: retrain every weight, from the deployed model or from scratch."""

from __future__ import annotations

from pydantic import Field

from server.training.dress_support import dress_of, train_from_scratch
from server.training.policy import PolicyParams, RoundInputs, RoundOutcome, UpdatePolicy
from shared.models import build_model, init_weights_from_seed
from shared.training import TrainConfig, accuracy, train_supervised


class FullParams(PolicyParams):
    epochs: int = Field(5, ge=1, le=1000, description="Passes over the labelled training split.")
    batch_size: int = Field(64, ge=1, le=65536)
    lr: float = Field(1e-3, gt=0, le=10)
    weight_decay: float = Field(0.0, ge=0, le=1)
    seed: int = Field(0, ge=0, description="Minibatch order (and init when from_scratch).")
    from_scratch: bool = Field(False, description="Start from fresh seeded weights, not the deployed model.")
    skip_if_worse: bool = Field(True, description="Ship nothing unless validation accuracy beats the deployed model.")
    min_labelled: int = Field(20, ge=1, description="Skip the round with fewer labelled samples.")


class FullRetrainPolicy(UpdatePolicy):
    name = "full"
    Params = FullParams

    def run(self, inputs: RoundInputs) -> RoundOutcome:
        p: FullParams = inputs.params
        data = inputs.data
        if data.total < p.min_labelled:
            return RoundOutcome(None, {"labelled_samples": data.total},
                                skip_reason=f"only {data.total} labelled samples (min_labelled={p.min_labelled})")
        model = build_model(inputs.arch)
        base_acc = None
        if inputs.base_state is not None:
            model.load_state_dict(inputs.base_state)
            base_acc = accuracy(model, data.x_val, data.y_val) if len(data.y_val) else None
        if p.from_scratch or inputs.base_state is None:
            init_weights_from_seed(model, p.seed)
        x_val, y_val = (data.x_val, data.y_val) if len(data.y_val) else (None, None)
        dress = dress_of(inputs.arch)
        if dress is not None and x_val is not None:
            # A DRESS fleet: full updating trains the whole DRESS objective (Alg. 3.1).
            extra = train_from_scratch(model, dress, data, epochs=p.epochs, batch_size=p.batch_size, seed=p.seed,
                                       progress=inputs.progress)
            accs = extra["subnet_val_accuracy"]
            metrics = {"labelled_samples": data.total, "train_samples": len(data.y_train),
                       "val_samples": len(data.y_val), "val_accuracy": sum(accs) / len(accs),
                       "subnet_val_accuracy": accs, "base_val_accuracy": None, "variant": "dress-full"}
            return RoundOutcome(model.state_dict(), metrics, reinit_seed=p.seed if p.from_scratch else None)
        stats = train_supervised(
            model, data.x_train, data.y_train,
            TrainConfig(epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay, seed=p.seed),
            x_val=x_val, y_val=y_val, progress=inputs.progress,
        )
        val_acc = stats["val_accuracy"] if x_val is not None else None
        metrics = {
            "labelled_samples": data.total, "train_samples": len(data.y_train), "val_samples": len(data.y_val),
            "val_accuracy": val_acc, "base_val_accuracy": base_acc, "train_loss": stats["train_loss"],
        }
        if p.skip_if_worse and base_acc is not None and val_acc is not None and val_acc <= base_acc:
            return RoundOutcome(None, metrics, skip_reason=(
                f"validation accuracy {val_acc:.4f} does not beat the deployed model's {base_acc:.4f}"))
        return RoundOutcome(model.state_dict(), metrics, reinit_seed=p.seed if p.from_scratch else None)
