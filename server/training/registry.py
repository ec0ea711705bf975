"""Update policies by name; a round's ``method`` picks one."""

from __future__ import annotations

from server.domain.errors import InvalidArgumentError
from server.training.da3 import DA3Policy
from server.training.dpu import DPUPolicy
from server.training.full import FullRetrainPolicy
from server.training.pmeta import PMetaPolicy
from server.training.policy import UpdatePolicy

POLICIES: dict[str, UpdatePolicy] = {p.name: p for p in (FullRetrainPolicy(), DPUPolicy(), PMetaPolicy(), DA3Policy())}
DEFAULT_METHOD = "dpu"


def get_policy(method: str) -> UpdatePolicy:
    try:
        return POLICIES[method]
    except KeyError:
        raise InvalidArgumentError(f"unknown method {method!r}; available: {sorted(POLICIES)}") from None
