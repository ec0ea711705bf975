"""Cost of each subnet for the agent's budget decisions: FLOPs, bytes, latency, memory.

FLOPs follow the thesis' "theoretical FLOPs" (§3.4.3): the multiply-accumulates of conv/fc
layers over their *nonzero* weights (``MACs``; ``flops = 2 * MACs``); norms, biases, ReLU and
pooling are excluded. Latency is wall-clock at batch 1 on this process's CPU threads.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from shared.dress.layers import DressError
from shared.dress.plan import compile_plan
from shared.dress.runner import DressRunner
from shared.dress.serialize import storage_bytes
from shared.dress.tables import DressTables, subnet_tables


def subnet_flops(tables: DressTables, k: int | None) -> dict[str, int]:
    """``{"macs", "flops"}`` of subnet ``k`` at batch 1 (``k=None``: the dense backbone)."""
    if k is not None and not 0 <= k < tables.num_subnets:
        raise DressError(f"subnet {k} out of range [0, {tables.num_subnets})")
    positions = _layer_positions(tables)
    macs = 0
    for t in tables.layers:
        per_row = t.row_size if k is None else t.counts[k]
        macs += t.rows * per_row * positions[t.name]
    return {"macs": macs, "flops": 2 * macs}


def _layer_positions(tables: DressTables) -> dict[str, int]:
    """Output positions per layer (H*W for conv, 1 for fc), from the runner's shape pass."""
    positions = {}
    for op in compile_plan(tables):
        if op.kind == "conv":
            positions[op.table.name] = op.in_shape[1] * op.in_shape[2]
        elif op.kind == "fc":
            positions[op.table.name] = 1
    return positions


def subnet_storage(tables: DressTables) -> dict[str, object]:
    """Serialised bytes: ``total`` (all K subnets), and ``per_subnet[k]`` (subnet k alone)."""
    return {
        "total": storage_bytes(tables),
        "per_subnet": [storage_bytes(subnet_tables(tables, k)) for k in range(tables.num_subnets)],
    }


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p95_ms: float
    mean_ms: float
    reps: int
    threads: int


def measure_latency(
    model: nn.Module, k: int | None, input_shape: tuple[int, ...], reps: int = 200, warmup: int = 20
) -> Latency:
    """Batch-1 forward latency of subnet ``k`` of a :class:`DressRunner` (or of any module,
    ``k=None``), on a fixed random input of ``input_shape`` (without the batch dimension)."""
    if reps < 1 or warmup < 0:
        raise DressError(f"reps must be >= 1 and warmup >= 0, got {reps}, {warmup}")
    if isinstance(model, DressRunner):
        if k is None:
            raise DressError("give the subnet index k to time a DressRunner")
        model.set_subnet(k)
    elif k is not None:
        raise DressError(f"k={k} given but {type(model).__name__} is not a DressRunner")
    x = torch.rand(1, *input_shape, generator=torch.Generator().manual_seed(0))
    model.eval()
    times = []
    with torch.inference_mode():
        for i in range(warmup + reps):
            start = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    times.sort()
    p95 = times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))]
    return Latency(
        p50_ms=statistics.median(times) * 1e3,
        p95_ms=p95 * 1e3,
        mean_ms=statistics.fmean(times) * 1e3,
        reps=reps,
        threads=torch.get_num_threads(),
    )


def measure_switch(runner: DressRunner, reps: int = 200) -> float:
    """Median seconds of ``set_subnet`` cycling through all subnets."""
    times = []
    for i in range(reps):
        k = i % runner.num_subnets
        start = time.perf_counter()
        runner.set_subnet(k)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_estimate(runner: DressRunner, batch: int = 1) -> int:
    """Bytes resident during a forward: tables, folded norms, scratch and the largest
    temporaries (see :meth:`DressRunner.memory_bytes`)."""
    return runner.memory_bytes(batch)["peak"]
