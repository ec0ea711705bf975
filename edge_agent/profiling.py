"""Profile every DRESS subnet on this device, for the budget governor (thesis §3.1, §3.4.3).

The thesis leaves the choice of subnet to the device under its resource constraints; the
governor needs each subnet's cost measured *here*: batch-1 latency (p50/p95), peak memory,
theoretical FLOPs, and energy per call (the battery's measured power x p50 latency where the
battery reports power, else a FLOPs proxy; ``edge_agent.governor.energy_mj``).

Timing runs on a private :class:`~shared.dress.DressRunner` over the running model's tables
(the tables are read-only and shared, so it costs only scratch buffers): the live runner keeps
serving inference on its own subnet meanwhile, never waiting for the profile.

Before timing, each layer's kernel (sparse, or the dense masked path) is chosen by measurement
per subnet at batch 1 and 32 (:func:`shared.dress.kernels.choose_kernels`); the latencies are
those of the chosen kernels, each profile records them (``SubnetProfile.kernels``), and the
caller installs the same plan on the live runner (``ModelRunner.set_kernels``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from edge_agent.governor import DEFAULT_PJ_PER_FLOP, SubnetProfile, energy_mj
from edge_agent.runner import ModelRunner
from shared.dress import (
    DressError,
    DressRunner,
    DressTables,
    measure_latency,
    peak_memory_estimate,
    subnet_flops,
    subnet_tables,
)
from shared.dress.kernels import KernelPlan, choose_kernels

log = logging.getLogger(__name__)
MB = 1 << 20


class ProfilingError(ValueError):
    """Profiling was asked of a model without DRESS subnets, or with bad settings."""


def subnet_memory_mb(tables: DressTables, k: int) -> float:
    """Peak memory of a batch-1 forward of subnet ``k`` alone: its prefix of the tables
    (``subnet_tables``), folded norms, scratch and temporaries.

    Nested tables let a device keep only the prefix ``[:, :n_k]`` of every table resident
    (§3.3.4), so a memory budget chooses between subnets by this figure. Pricing the full
    K-subnet tables instead would give every subnet the same memory and make a memory budget
    unable to prefer a sparser subnet.
    """
    return peak_memory_estimate(DressRunner(subnet_tables(tables, k)), batch=1) / MB


def profile_subnets(
    runner: ModelRunner,
    reps: int,
    power_w: float | None = None,
    *,
    warmup: int | None = None,
    accuracies: Sequence[float | None] | None = None,
    pj_per_flop: float = DEFAULT_PJ_PER_FLOP,
    kernels: KernelPlan | None = None,
) -> list[SubnetProfile]:
    """One :class:`SubnetProfile` per subnet of the DRESS model ``runner`` runs now.

    ``reps`` timed batch-1 calls per subnet after ``warmup`` untimed ones (default
    ``min(reps, 20)``); ``power_w`` the device's measured draw (None: FLOPs proxy);
    ``accuracies`` per-subnet validation accuracy if the server reported it; ``kernels`` a
    plan to time with (default: chosen here by measurement and installed on ``runner`` too).
    """
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ProfilingError(f"reps must be an int >= 1, got {reps!r}")
    model_hash = runner.model_hash  # the plan is installed only while this model runs
    tables = runner.tables
    if tables is None:
        raise ProfilingError(f"model {runner.model_hash[:12] or '(none)'} has no DRESS subnets "
                             "to profile")
    k_total = tables.num_subnets
    if accuracies is not None and len(accuracies) != k_total:
        raise ProfilingError(f"got {len(accuracies)} accuracies for {k_total} subnets")
    warmup = min(reps, 20) if warmup is None else warmup
    timer = DressRunner(tables)
    try:
        plan = kernels if kernels is not None else choose_kernels(timer)
        timer.set_kernels(plan)
    except DressError as exc:
        raise ProfilingError(str(exc)) from exc
    if kernels is None:
        runner.set_kernels(plan, model_hash)
    profiles = []
    for k in range(k_total):
        try:
            lat = measure_latency(timer, k, tables.spec.input_shape, reps=reps, warmup=warmup)
        except DressError as exc:
            raise ProfilingError(str(exc)) from exc
        flops = subnet_flops(tables, k)["flops"]
        energy, source = energy_mj(lat.p50_ms, flops, power_w, pj_per_flop)
        profiles.append(SubnetProfile(
            index=k, sparsity=tables.sparsities[k],
            accuracy=None if accuracies is None else accuracies[k],
            latency_p50_ms=lat.p50_ms, latency_p95_ms=max(lat.p95_ms, lat.p50_ms),
            peak_memory_mb=subnet_memory_mb(tables, k), energy_mj=energy, energy_source=source,
            flops=flops, kernels=plan.codes(k),
        ))
    log.info("profiled %d subnets of %s: p50 %s ms", k_total, runner.model_hash[:12],
             ", ".join(f"{p.latency_p50_ms:.3g}" for p in profiles))
    return profiles


__all__ = ["ProfilingError", "profile_subnets", "subnet_memory_mb"]
