"""Evaluation: ranking metrics, per-user paired tests and seed intervals."""
