"""The MLflow model's code (models-from-code): the logged model is this file plus its artifacts, never a pickle."""
from mlflow.models import set_model

from feddmmr.serving.pyfunc import FedDMMRModel

set_model(FedDMMRModel())
