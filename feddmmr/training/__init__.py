"""Training: checkpoints, the federated stages, resume state, the centralized counterpart, baselines."""
