"""The study: base model, experiments, sweeps, and the measurements of each variant."""
