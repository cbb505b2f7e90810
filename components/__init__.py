"""One module per step kind: each exposes run(spec, ctx) -> StepOutput."""
