"""The inference service: poll the input source, predict, log predictions, keep labelled inputs
in the local dataset, and queue samples for upload. It never touches the network, so a dead
link never delays a prediction.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from edge_agent.local_data import LocalDataset
from edge_agent.predictions import PredictionLog
from edge_agent.runner import ModelRunner, Prediction
from edge_agent.settings import AgentSettings
from edge_agent.sources import DatasetShardSource, FolderWatchSource, InputSource, Observation
from edge_agent.upload_policy import UploadPolicy
from edge_agent.upload_queue import QueuedSample, UploadQueue
from shared.samples import encode_sample, sample_id

log = logging.getLogger(__name__)


def make_source(settings: AgentSettings, input_shape: tuple[int, ...] | None = None) -> InputSource:
    """The input source the settings name: a watched folder, or a shard of a dataset."""
    if settings.source == "folder":
        if input_shape is None:
            raise ValueError("a folder source needs the model input shape")
        return FolderWatchSource(settings.watch_dir, input_shape,
                                 state_file=settings.data_dir / "folder_state.json")
    from shared.data import load_dataset, shard_non_iid

    ds = load_dataset(settings.dataset)
    x, y = (ds.x_train, ds.y_train) if settings.dataset_split == "train" else (ds.x_test, ds.y_test)
    shard = shard_non_iid(y, settings.num_shards, alpha=settings.shard_alpha,
                          seed=settings.shard_seed)[settings.shard_index]
    if settings.max_samples:
        shard = shard[: settings.max_samples]
    return DatasetShardSource(x[shard], y[shard], rate_per_s=settings.rate_per_s or float("inf"),
                              seed=settings.shard_seed + settings.shard_index,
                              loop=settings.loop_source, send_labels=settings.send_labels)


class InferenceService:
    name = "inference"

    def __init__(self, source: InputSource, runner: ModelRunner, *, batch: int,
                 predictions: PredictionLog, policy: UploadPolicy, queue: UploadQueue,
                 local_data: LocalDataset, observe=lambda _p: None) -> None:
        self.source = source
        self.runner = runner
        self.batch = batch
        self.predictions = predictions
        self.policy = policy
        self.queue = queue
        self.local_data = local_data
        self._observe = observe  # each batch-1 DRESS timing (the governor's drift estimate)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            batch = self.source.poll(self.batch)
            if not batch:
                stop.wait(0.05)
                continue
            self.handle(batch)

    def handle(self, batch: list[Observation]) -> None:
        now = time.time()
        confs: np.ndarray | None = None
        if self.runner.arch is not None:
            shape = self.runner.arch.input_shape
            bad = [o for o in batch if tuple(o.x.shape) != shape]
            if bad:
                # The server would reject them anyway: do not spend the uplink on them.
                log.warning("dropping %d inputs of shape %s: the model takes %s", len(bad),
                            bad[0].x.shape, shape)
                batch = [o for o in batch if tuple(o.x.shape) == shape]
                if not batch:
                    return
        if self.runner.ready:
            if self.runner.is_dress:
                preds, confs, hashes = self._predict_one_by_one(batch)
            else:
                out = self.runner.predict_timed(np.stack([o.x for o in batch]))
                preds, confs, hashes = out.pred, out.conf, [out.model_hash] * len(batch)
            for o, p, c, h in zip(batch, preds, confs, hashes, strict=True):
                self.predictions.add(int(p), float(c), o.label, h, now)
        # Probation and the learner judge on these; one transaction per batch.
        self.local_data.add_many([(o.x, o.label) for o in batch if o.label is not None])
        for i, o in enumerate(batch):
            confidence = float(confs[i]) if confs is not None else 0.0
            if not self.policy.should_upload(confidence):
                continue
            payload = encode_sample(o.x)
            self.queue.put(QueuedSample(sample_id(payload), payload, o.label, dict(o.metadata), now))

    def _predict_one_by_one(
        self, batch: list[Observation]
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """DRESS: batch-1 calls, the quantity the subnets were profiled with, each timing fed to
        the governor's drift estimate (a 32-input batch would read as a 32x slowdown)."""
        preds, confs, hashes = [], [], []
        for o in batch:
            p: Prediction = self.runner.predict_timed(o.x[None])
            preds.append(p.pred[0])
            confs.append(p.conf[0])
            hashes.append(p.model_hash)
            self._observe(p)
        return np.array(preds), np.array(confs, dtype=np.float32), hashes
