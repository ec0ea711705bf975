"""The upload service: drain the on-disk queue to the server, acknowledging only samples the
server says it committed (or rejected for good). Transient failures back off with jitter."""

from __future__ import annotations

import logging
import threading

from edge_agent.backoff import Backoff
from edge_agent.client import CredentialRejected, PermanentError, TransientError
from edge_agent.connection import Connection
from edge_agent.upload_queue import UploadQueue

log = logging.getLogger(__name__)
MAX_UPLOAD_BYTES = 4 << 20  # per UploadSamples call


class UploaderService:
    name = "uploader"

    def __init__(self, conn: Connection, queue: UploadQueue, *, batch: int, interval_s: float,
                 backoff: Backoff) -> None:
        self.conn = conn
        self.queue = queue
        self.batch = batch
        self.interval_s = interval_s
        self.backoff = backoff
        self.uploaded = 0
        self.rejected = 0

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if not self.conn.registered:
                stop.wait(0.2)
                continue
            batch = self.queue.peek_batch(self.batch, MAX_UPLOAD_BYTES)
            if not batch:
                stop.wait(self.interval_s)
                continue
            try:
                resp = self.conn.client.upload(batch)
            except TransientError as exc:
                self.conn.offline(exc)
                stop.wait(self.backoff.next_delay(exc))  # never before the server's retry-after
                continue
            except CredentialRejected:
                self.conn.forget_identity()
                continue
            except PermanentError as exc:
                log.error("upload refused: %s", exc)
                self.conn.report_error(str(exc))
                stop.wait(self.backoff.next_delay())
                continue
            self.backoff.reset()
            self.conn.online()
            self.queue.ack(list(resp.committed_ids) + [r.sample_id for r in resp.rejected])
            self.uploaded += resp.accepted
            if resp.rejected:
                self.rejected += len(resp.rejected)
                log.warning("%d samples rejected by the server: %s", len(resp.rejected),
                            resp.rejected[0].reason)

    def metrics(self) -> dict[str, float]:
        return {"queue_len": float(len(self.queue)), "queue_dropped": float(self.queue.dropped),
                "uploaded": float(self.uploaded), "rejected": float(self.rejected)}
