from .feddmmr import GROUPS, FedDMMR, group_of
from .sasrec import SASRec

__all__ = ["GROUPS", "FedDMMR", "SASRec", "group_of"]
