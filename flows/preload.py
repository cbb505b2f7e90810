"""Imported once by the engine's fork server, so that every forked step starts with these loaded.

Importing torch, transformers, Lightning, peft, TRL and MLflow's stores costs several seconds per process;
a step forked from a server that already holds them starts in milliseconds (benchmarks/bench_isolation.py).
Only imports: nothing here may run a torch operation or touch CUDA or a database, because a forked child
cannot use a thread pool, a CUDA context or a connection that its parent made.
"""

import matplotlib

matplotlib.use("Agg")  # steps draw into files; choose the backend before pyplot is imported anywhere

from components.lib.quantize import import_torchao  # noqa: E402

import_torchao()  # before peft imports it: without torchao's start-up warnings about kernels a CPU build lacks
import lightning  # noqa: E402,F401
import matplotlib.pyplot  # noqa: E402,F401
import mlflow  # noqa: E402,F401
import mlflow.store.model_registry.sqlalchemy_store  # noqa: E402,F401
import mlflow.store.tracking.sqlalchemy_store  # noqa: E402,F401
import mlflow.transformers  # noqa: E402,F401
import peft  # noqa: E402,F401
import torch  # noqa: E402,F401
import transformers  # noqa: E402,F401
import trl.trainer.utils  # noqa: E402,F401
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402,F401
from transformers.models.llama import modeling_llama  # noqa: E402,F401

import importlib  # noqa: E402

from schemas import KINDS  # noqa: E402

for _kind in KINDS:  # every step kind's own module, so a step costs no import at all
    importlib.import_module(f"components.{_kind}")
