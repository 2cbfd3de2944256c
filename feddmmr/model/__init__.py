from .feddmmr import GROUPS, FedDMMR, FedDMMRConfig, group_of
from .sasrec import SASRec

__all__ = ["GROUPS", "FedDMMR", "FedDMMRConfig", "SASRec", "group_of"]
