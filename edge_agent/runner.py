"""The model runner: owns the in-memory model the agent infers with.

This is the seam DRESS plugs into (a runner over nested sparse subnets with ``set_subnet``);
the daemon only uses ``load``, ``predict``, ``model_hash`` and ``describe``.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from shared.models import ArchSpec, build_model
from shared.tensors import to_model_input


class ModelRunner:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._model: torch.nn.Module | None = None
        self.arch: ArchSpec | None = None
        self.model_hash = ""
        self.state: dict[str, torch.Tensor] | None = None

    @property
    def ready(self) -> bool:
        return self._model is not None

    def load(self, arch: ArchSpec, state: dict[str, torch.Tensor], model_hash: str) -> None:
        """Build the new model fully, then swap it in under the lock (inference never sees a
        half-loaded model)."""
        model = build_model(arch)
        model.load_state_dict(state)
        model.eval()
        with self._lock:
            self._model, self.arch, self.model_hash, self.state = model, arch, model_hash, state

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Predicted classes and their softmax confidences for a batch."""
        with self._lock:
            if self._model is None:
                raise RuntimeError("no model loaded")
            probs = torch.softmax(self._model(to_model_input(x)), dim=1)
        conf, pred = probs.max(dim=1)
        return pred.numpy(), conf.numpy()

    def describe(self) -> dict:
        return {"model_hash": self.model_hash, "arch": self.arch.to_json() if self.arch else None, "active_subnet": -1}
