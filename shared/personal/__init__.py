"""Personal models: a device's local adaptation of the fleet model (docs/learner.md).

``learner`` defines the seam (:class:`Learner`, :class:`PersonalDelta`, the registry),
``format`` the ``personal/v1`` bytes, ``head`` the classifier-head fine-tuning test learner.
p-Meta (few-shot new classes) and DA³ (domain adaptors) plug in as further learners.
"""

from shared.personal.da3 import DA3Learner, DA3LearnerConfig  # registers 'da3'
from shared.personal.format import (
    PERSONAL_ENCODING,
    PersonalArtefact,
    PersonalFormatError,
    decode_personal,
    encode_personal,
)
from shared.personal.head import HeadFinetuneConfig, HeadFinetuneLearner
from shared.personal.learner import (
    Learner,
    LearnerConfig,
    LearnerError,
    LearnerRefused,
    PersonalDelta,
    learner_names,
    make_learner,
    register_learner,
)
from shared.personal.pmeta import PMetaLearner, PMetaLearnerConfig  # registers 'pmeta'

__all__ = [
    "PERSONAL_ENCODING",
    "HeadFinetuneConfig",
    "HeadFinetuneLearner",
    "Learner",
    "LearnerConfig",
    "LearnerError",
    "LearnerRefused",
    "PersonalArtefact",
    "PersonalDelta",
    "PersonalFormatError",
    "DA3Learner",
    "DA3LearnerConfig",
    "PMetaLearner",
    "PMetaLearnerConfig",
    "decode_personal",
    "encode_personal",
    "learner_names",
    "make_learner",
    "register_learner",
]
