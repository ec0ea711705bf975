"""Model architectures, their JSON spec, and seeded initialisation."""

from shared.models.init import init_weights_from_seed
from shared.models.spec import KINDS, ArchSpec, default_spec
from shared.models.zoo import MLP, SmallCNN, build_model

__all__ = ["KINDS", "MLP", "ArchSpec", "SmallCNN", "build_model", "default_spec", "init_weights_from_seed"]
