from feddmmr.model.feddmmr import GROUPS, FedDMMR, FedDMMRConfig, group_of
from feddmmr.model.sasrec import SASRec

__all__ = ["GROUPS", "FedDMMR", "FedDMMRConfig", "SASRec", "group_of"]
