"""The library under the step kinds: what two or more kinds need, implemented once.

Rules (tests/test_layers.py reads the imports to keep them):
- A step kind (`components/<kind>`) imports this library, never another step kind.
- The library never imports a step kind, and never reads a step spec: its functions take explicit
  arguments (shared settings sections such as `OptimizerSpec`, `PeftSpec` or a `data:` section are fine).
- One concept, one implementation, its exact definition in its docstring: perplexity and token scoring
  (`scoring`), exact match and task accuracy (`evaluation`), model loading (`models`), JSONL (`io`).
"""
