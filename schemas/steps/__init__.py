"""The step kinds. Adding a kind: write its module here and add its spec to STEP_SPECS."""

from .collect import CollectSpec
from .compare import CompareSpec
from .constitutional import ConstitutionalSpec
from .distill import DistillSpec
from .dpo import DpoSpec
from .evaluate import EvaluateSpec
from .feedforward import FeedforwardSpec
from .finetune import FinetuneSpec
from .grpo import GrpoSpec
from .monitor import MonitorSpec
from .optimize import OptimizeSpec
from .ppo import PPOSpec
from .pretrain import PretrainSpec
from .register import RegisterSpec
from .reward_model import RewardModelSpec
from .scaling import ScalingSpec
from .tokenize import TokenizeSpec

STEP_SPECS = (
    TokenizeSpec,
    PretrainSpec,
    EvaluateSpec,
    FinetuneSpec,
    CollectSpec,
    RewardModelSpec,
    PPOSpec,
    GrpoSpec,
    ConstitutionalSpec,
    DpoSpec,
    RegisterSpec,
    OptimizeSpec,
    MonitorSpec,
    CompareSpec,
    DistillSpec,
    FeedforwardSpec,
    ScalingSpec,
)
