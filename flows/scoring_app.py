"""The app `llmcycle serve`'s scoring server runs: MLflow's, after llmcycle's model classes are registered.

MLflow's scoring server loads the model in a process of its own; the pre-transformer families (`mlp`, `rnn`,
`lstm`: components/lib/sequence_models.py) load through transformers' Auto classes only once llmcycle's
library has registered them, so this module imports the library first, then MLflow's app (which loads the
model from `__pyfunc_model_path__` as it is imported).
"""

import components.lib.models  # noqa: F401  (registers llmcycle's model classes with the Auto classes)
from mlflow.pyfunc.scoring_server.app import app  # noqa: F401, E402
