"""Model architectures, their JSON spec, seeded initialisation, and the model-family registry."""

from shared.models.families import (
    FamilyError,
    ModelFamily,
    UnknownFamilyError,
    families_of,
    get_family,
    inference_engine,
    installed_families,
    register_family,
)
from shared.models.identity import MODEL_HASH_DOMAIN, model_hash
from shared.models.init import init_weights_from_seed
from shared.models.spec import KINDS, ArchSpec, default_spec
from shared.models.zoo import MLP, SmallCNN, build_model

__all__ = [
    "KINDS", "MLP", "MODEL_HASH_DOMAIN", "ArchSpec", "FamilyError", "ModelFamily", "SmallCNN", "UnknownFamilyError",
    "build_model", "default_spec", "families_of", "get_family", "inference_engine",
    "init_weights_from_seed", "installed_families", "model_hash", "register_family",
]  # fmt: skip
