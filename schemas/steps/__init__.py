"""The step kinds. Adding a kind: write its module here and add its spec to STEP_SPECS."""

from .constitutional import ConstitutionalSpec
from .dpo import DpoSpec
from .optimize import OptimizeSpec
from .register import RegisterSpec
from .reward_model import RewardModelSpec
from .tokenize import TokenizeSpec

STEP_SPECS = (
    TokenizeSpec,
    RewardModelSpec,
    RegisterSpec,
    OptimizeSpec,
    DpoSpec,
    ConstitutionalSpec,
)
