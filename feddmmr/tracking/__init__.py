"""The records: the MLflow store, the stage run writer, reports, checkpoint diffs, the model registry."""
