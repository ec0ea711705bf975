"""Per-layer kernel choice by measurement (docs/dress.md, "Kernel choice").

For every subnet ``k``, every profiled batch size ``b`` and every conv/fc layer, the sparse
ELL kernel of :class:`~shared.dress.DressRunner` and its dense masked path (torch's dense
conv/matmul over the subnet's masked weight) are timed side by side, interleaved, and the
faster one is kept (ties: dense, the reference path). The choice is a pure function of the
recorded timings (:meth:`KernelPlan.from_timings`), so a profile that stores them replays to
the same plan; a forward at another batch size uses the plan of the nearest profiled size (in
log2, ties to the smaller).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from shared.dress.layers import DressError

if TYPE_CHECKING:
    from shared.dress.runner import DressRunner

KERNELS = ("sparse", "dense")
PROFILE_BATCHES = (1, 32)
MODULE_MARGIN = 1.10  # the runner must beat the dense masked module by 10% to be kept
# measure(runner, k, batch, layer_index, kernel) -> seconds per call of that layer; layer -1
# is the whole subnet: "sparse" = the runner with the per-layer choice, "dense" = the module
Measure = Callable[["DressRunner", int, int, int, str], float]


@dataclass(frozen=True)
class KernelPlan:
    """``dense[k][i][l]``: run layer ``l`` of subnet ``k`` densely at ``batches[i]``."""

    layers: tuple[str, ...]
    batches: tuple[int, ...]
    dense: tuple[tuple[tuple[bool, ...], ...], ...]
    timings: tuple[tuple[tuple[tuple[float, float], ...], ...], ...] = ()  # (sparse, dense) s
    # module[k][i]: run subnet k at batches[i] as the dense masked nn.Module instead (the
    # whole-subnet check: (runner with the per-layer choice, module) seconds in whole[k][i]).
    module: tuple[tuple[bool, ...], ...] = ()
    whole: tuple[tuple[tuple[float, float], ...], ...] = ()

    def __post_init__(self) -> None:
        if not self.batches or list(self.batches) != sorted(set(self.batches)) or self.batches[0] < 1:
            raise DressError(f"kernel plan batches must be ascending ints >= 1, got {self.batches}")
        for per_k in self.dense:
            if len(per_k) != len(self.batches) or any(len(c) != len(self.layers) for c in per_k):
                raise DressError("kernel plan shape does not match its layers and batches")
        if not self.module:
            object.__setattr__(
                self, "module", tuple((False,) * len(self.batches) for _ in self.dense)
            )
        if len(self.module) != len(self.dense) or any(
            len(m) != len(self.batches) for m in self.module
        ):
            raise DressError("kernel plan module flags do not match its subnets and batches")

    @property
    def num_subnets(self) -> int:
        return len(self.dense)

    def bucket(self, batch: int) -> int:
        """Index of the profiled batch size nearest to ``batch`` in log2 (ties: smaller)."""
        dist = [abs(math.log2(batch) - math.log2(b)) for b in self.batches]
        return min(range(len(dist)), key=lambda i: (dist[i], i))

    def codes(self, k: int) -> tuple[str, ...]:
        """Compact record for a profile: ``"<batch>:<s|d per layer>"`` per profiled batch."""
        return tuple(
            f"{b}:" + ("M" if self.module[k][i] else "")
            + "".join("d" if d else "s" for d in self.dense[k][i])
            for i, b in enumerate(self.batches)
        )

    @classmethod
    def from_timings(
        cls,
        layers: Sequence[str],
        batches: Sequence[int],
        timings: Sequence[Sequence[Sequence[tuple[float, float]]]],
        whole: Sequence[Sequence[tuple[float, float]]] | None = None,
    ) -> KernelPlan:
        """The plan the recorded ``timings[k][i][l] = (sparse_s, dense_s)`` and
        ``whole[k][i] = (runner_s, module_s)`` imply (ties: dense; the module unless the
        runner is more than ``MODULE_MARGIN`` faster)."""
        whole_t = tuple(
            tuple((float(a), float(b)) for a, b in per_k) for per_k in (whole or ())
        )
        # The module is the dense model itself: keep the runner only when it is clearly
        # (MODULE_MARGIN) faster, so timing noise cannot make a subnet slower than dense.
        module = tuple(tuple(t[1] <= t[0] * MODULE_MARGIN for t in per_k) for per_k in whole_t)
        dense = tuple(
            tuple(tuple(t[1] <= t[0] for t in per_b) for per_b in per_k) for per_k in timings
        )
        frozen = tuple(
            tuple(tuple((float(a), float(b)) for a, b in per_b) for per_b in per_k)
            for per_k in timings
        )
        return cls(
            tuple(layers), tuple(int(b) for b in batches), dense, frozen, module, whole_t
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "batches": list(self.batches),
            "timings": [[[list(t) for t in per_b] for per_b in per_k] for per_k in self.timings],
            "whole": [[list(t) for t in per_k] for per_k in self.whole],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KernelPlan:
        try:
            return cls.from_timings(
                data["layers"], data["batches"], data["timings"], data.get("whole") or None
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, DressError):
                raise
            raise DressError(f"malformed kernel plan: {exc!r}") from exc

    @classmethod
    def uniform(cls, layers: Sequence[str], num_subnets: int, dense: bool) -> KernelPlan:
        """Every layer sparse (or dense) at every batch size: for tests and baselines."""
        row = tuple(dense for _ in layers)
        return cls(tuple(layers), (1,), tuple((row,) for _ in range(num_subnets)))


def time_layer(
    runner: DressRunner, k: int, batch: int, layer: int, kernel: str, reps: int = 7
) -> float:
    """Median seconds of one call of layer ``layer`` of subnet ``k`` at ``batch`` with ``kernel``."""
    call = runner.layer_call(k, batch, layer, kernel)
    for _ in range(2):
        call()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def choose_kernels(
    runner: DressRunner,
    batches: Sequence[int] = PROFILE_BATCHES,
    measure: Measure | None = None,
    *,
    rounds: int = 3,
) -> KernelPlan:
    """Time both kernels of every layer of every subnet at each batch size and keep the faster.

    ``measure`` defaults to :func:`time_layer`; the dense call and the K sparse calls of a
    layer alternate ``rounds`` times and the medians are compared, so machine-load drift hits
    both alike. The dense path is timed once per layer and batch (as ``k = 0``): its cost does
    not depend on the subnet. Leaves
    ``runner`` on the subnet it was on, with the returned plan installed.
    """
    if rounds < 1:
        raise DressError(f"rounds must be >= 1, got {rounds}")
    fn: Measure = measure or time_layer
    bs = tuple(sorted({int(b) for b in batches}))
    current = runner.subnet
    layers = runner.layer_names
    n_k = runner.num_subnets
    # timings[k][i][l] = (sparse, dense); the dense path's cost does not depend on the subnet
    # (same dense kernel, weight scattered at switch time), so it is timed once, as subnet 0.
    timings: list[list[list[tuple[float, float]]]] = [[[] for _ in bs] for _ in range(n_k)]
    with torch.no_grad():
        for i, b in enumerate(bs):
            for li in range(len(layers)):
                dense: list[float] = []
                sparse: list[list[float]] = [[] for _ in range(n_k)]
                for _ in range(rounds):
                    dense.append(fn(runner, 0, b, li, "dense"))
                    for k in range(n_k):
                        sparse[k].append(fn(runner, k, b, li, "sparse"))
                d = statistics.median(dense)
                for k in range(n_k):
                    timings[k][i].append((statistics.median(sparse[k]), d))
    layer_plan = KernelPlan.from_timings(layers, bs, timings)
    runner.set_kernels(layer_plan)
    # Whole-subnet check: the runner with that choice against the dense masked module (what
    # a dense model costs), so the chosen path is never slower than dense (up to noise).
    whole: list[list[tuple[float, float]]] = []
    with torch.no_grad():
        for k in range(n_k):
            per_k = []
            for b in bs:
                run, mod = [], []
                for _ in range(rounds):
                    run.append(fn(runner, k, b, -1, "sparse"))
                    mod.append(fn(runner, k, b, -1, "dense"))
                per_k.append((statistics.median(run), statistics.median(mod)))
            whole.append(per_k)
    plan = KernelPlan.from_timings(layers, bs, timings, whole)
    runner.set_kernels(plan)
    runner.set_subnet(current)
    return plan
