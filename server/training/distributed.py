"""`full` rounds trained with torch.distributed (DDP, gloo on CPU), launched by torchrun.

When the labelled data outgrows what one process trains in a round's time, the worker hands
a `full` round of a plain classifier to
``torchrun --nproc-per-node N -m server.training.distributed <job dir>`` (settings
``distributed_nproc_per_node``, ``distributed_min_samples``, ``distributed_torchrun_args``):

* the job directory (under ``<data_dir>/jobs``, so a shared data_dir reaches other nodes)
  holds the start weights (safetensors), the labelled arrays (``.npz``, no pickles) and the
  fit settings; ranks read nothing else;
* each rank trains on its own equal shard of the training split (a seeded permutation cut
  in ``world_size`` slices; up to ``world_size - 1`` samples are left out so every rank runs
  the same number of steps, which the all-reduce needs), with a per-rank batch of
  ``batch_size / world_size``: DDP averages the gradients of the same global batch size the
  single-process round uses, so the same learning rate applies;
* every rank validates on the whole validation split after each epoch: the replicas are equal
  after every all-reduce, so all keep the same best checkpoint without talking about it;
* rank 0 writes the result (weights + metrics) and a progress file the worker turns into the
  round's progress; the worker then evaluates, applies ``skip_if_worse`` and publishes exactly
  as for a single-process `full` round (:func:`train_full_distributed` mirrors
  ``FullRetrainPolicy.train``), so the artefacts are the same kinds.

Deviations from the single-process round, on purpose: the minibatch order differs (one
shuffle per rank), BatchNorm statistics are per rank (plain DDP, no SyncBatchNorm: the
classifiers here are MLPs or small CNNs whose per-shard statistics match closely), and
the families with objectives of their own (DRESS, p-Meta, DA3) keep training in one process.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from server.training.full import FullParams, finish_full, prepare_full
from server.training.policy import RoundInputs, RoundOutcome, UpdatePolicy, loss_bound
from shared.loop import LossBound, Validation, bound_loss, cross_entropy, run_loop, steps_per_epoch
from shared.models import ArchSpec, build_model
from shared.objectives import objective_for
from shared.tensors import to_model_input
from shared.training import accuracy

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
_PROGRESS_EVERY_S = 0.5
_RUNNING: set[subprocess.Popen] = set()


@atexit.register
def _stop_running() -> None:  # a worker that exits mid-round leaves no ranks behind
    for proc in list(_RUNNING):
        if proc.poll() is None:
            proc.terminate()


def nproc_for(settings: Any, policy: UpdatePolicy, inputs: RoundInputs) -> int:
    """How many processes this round trains with on this node (1: in the worker process)."""
    n = int(settings.distributed_nproc_per_node)
    if n <= 1 or policy.name != "full" or objective_for(inputs.arch).name != "plain":
        return 1
    if inputs.data.total < settings.distributed_min_samples or len(inputs.data.y_train) < n:
        return 1
    return n


def train_full_distributed(inputs: RoundInputs, *, nproc: int, jobs_dir: Path, torchrun_args: str = "") -> RoundOutcome:
    """``FullRetrainPolicy.train`` with the fit done by ``nproc`` DDP ranks (module docstring)."""
    start = prepare_full(inputs)
    if isinstance(start, RoundOutcome):
        return start
    p: FullParams = inputs.params
    data, model = inputs.data, start.model
    bound = loss_bound(inputs.arch, p)
    job = jobs_dir / f"job-{uuid.uuid4().hex[:12]}"
    job.mkdir(parents=True)
    try:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(job / "start.safetensors"))
        np.savez(job / "data.npz", x_train=data.x_train, y_train=data.y_train, x_val=data.x_val, y_val=data.y_val)
        (job / "job.json").write_text(json.dumps({
            "arch": json.loads(inputs.arch.to_json()), "epochs": p.epochs, "batch_size": p.batch_size, "lr": p.lr,
            "weight_decay": p.weight_decay, "seed": p.seed,
            "max_loss": bound.max_loss if bound else None, "max_loss_why": bound.why if bound else ""}))
        fit = _launch(job, nproc, torchrun_args, inputs.progress)
        model.load_state_dict(load_file(str(job / "result.safetensors")))
    finally:
        shutil.rmtree(job, ignore_errors=True)
    return finish_full(inputs, start, fit)


def torchrun_command(job: Path, nproc: int, torchrun_args: str = "") -> list[str]:
    where = shlex.split(torchrun_args) if torchrun_args.strip() else ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc-per-node={nproc}",
            "-m", "server.training.distributed", str(job)]


def _launch(job: Path, nproc: int, torchrun_args: str, progress: Any) -> dict[str, Any]:
    cmd = torchrun_command(job, nproc, torchrun_args)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    env.setdefault("OMP_NUM_THREADS", "1")
    log_path = job / "torchrun.log"
    log.info("distributed round: %s", shlex.join(cmd))
    t0 = time.monotonic()
    with log_path.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)  # our cwd: data_dir may be relative
        _RUNNING.add(proc)
        try:
            last: tuple[int, int] | None = None
            while proc.poll() is None:
                time.sleep(_PROGRESS_EVERY_S)
                last = _report(job, progress, last)
            _report(job, progress, last)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
            _RUNNING.discard(proc)
    if proc.returncode != 0 or not (job / "result.safetensors").exists():
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"distributed training failed (torchrun exit {proc.returncode}): {tail}")
    result = json.loads((job / "result.json").read_text())
    result["distributed_seconds"] = round(time.monotonic() - t0, 3)
    return result


def _report(job: Path, progress: Any, last: tuple[int, int] | None) -> tuple[int, int] | None:
    try:
        state = json.loads((job / "progress.json").read_text())
    except (OSError, ValueError):
        return last
    key = (int(state["step"]), int(state["total"]))
    if key != last and progress is not None:
        progress(key[0], key[1], {k: float(v) for k, v in state.get("metrics", {}).items()})
    return key


# --- one rank (run by torchrun) ---------------------------------------------------------------

def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def rank_main(job: Path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = json.loads((job / "job.json").read_text())
    arch = ArchSpec.from_dict(spec["arch"])
    model = build_model(arch)
    model.load_state_dict(load_file(str(job / "start.safetensors")))
    with np.load(job / "data.npz", allow_pickle=False) as arrays:
        x_train, y_train = arrays["x_train"], arrays["y_train"]
        x_val, y_val = arrays["x_val"], arrays["y_val"]
    seed = int(spec["seed"])
    per = len(y_train) // world
    order = np.random.Generator(np.random.PCG64(seed)).permutation(len(y_train))
    mine = order[rank * per:(rank + 1) * per]
    xs = x_train[mine]
    ys = torch.as_tensor(np.asarray(y_train[mine]), dtype=torch.long)
    batch = max(1, int(spec["batch_size"]) // world)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=float(spec["lr"]), weight_decay=float(spec["weight_decay"]))
    validation = Validation(lambda m: accuracy(model, x_val, y_val)) if len(y_val) > 0 else None
    last_write = [0.0]

    def progress(step: int, total: int, metrics: dict[str, float]) -> None:
        now = time.monotonic()
        if now - last_write[0] >= _PROGRESS_EVERY_S or step == total:
            last_write[0] = now
            _write_json(job / "progress.json", {"step": step, "total": total, "metrics": metrics})

    bound = LossBound(float(spec["max_loss"]), spec["max_loss_why"]) if spec["max_loss"] is not None else None
    with bound_loss(bound):
        out = run_loop(
            ddp, opt, cross_entropy, lambda idx: (to_model_input(xs[idx]), ys[idx]), per,
            batch_size=batch, num_steps=int(spec["epochs"]) * steps_per_epoch(per, batch),
            rng=np.random.Generator(np.random.PCG64(seed + 1 + rank)), validation=validation,
            progress=progress if rank == 0 else None,
            context=f"distributed supervised training (Adam, rank {rank} of {world})",
        )
    if rank == 0:
        best = out.best_state if out.best_state is not None else ddp.state_dict()
        state = {k.removeprefix("module."): v.contiguous() for k, v in best.items()}
        save_file(state, str(job / "result.safetensors.tmp"))
        os.replace(job / "result.safetensors.tmp", job / "result.safetensors")
        _write_json(job / "result.json", {
            "train_loss": out.epoch_loss, "world_size": world, "shard_samples": per, "per_rank_batch_size": batch,
            "distributed_val_accuracy": out.best_metric if out.best_state is not None else -1.0})
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: torchrun ... -m server.training.distributed <job dir>")
    rank_main(Path(sys.argv[1]))
