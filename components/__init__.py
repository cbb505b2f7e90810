"""One module (or package) per step kind, each exposing `run(spec, ctx) -> StepOutput`; shared code in `lib`."""
