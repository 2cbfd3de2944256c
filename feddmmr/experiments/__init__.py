"""Experiments: seed sweeps and ablations over the pipeline."""
