"""Serving: recommendations from a checkpoint, the MLflow pyfunc model, registered-model loading."""
