"""The step kinds. Adding a kind: write its module here and add its spec to STEP_SPECS."""

from .constitutional import ConstitutionalSpec
from .dpo import DpoSpec
from .evaluate import EvaluateSpec
from .finetune import FinetuneSpec
from .monitor import MonitorSpec
from .optimize import OptimizeSpec
from .ppo import PPOSpec
from .pretrain import PretrainSpec
from .register import RegisterSpec
from .reward_model import RewardModelSpec
from .tokenize import TokenizeSpec

STEP_SPECS = (
    TokenizeSpec,
    PretrainSpec,
    EvaluateSpec,
    FinetuneSpec,
    RewardModelSpec,
    PPOSpec,
    ConstitutionalSpec,
    DpoSpec,
    RegisterSpec,
    OptimizeSpec,
    MonitorSpec,
)
