"""Modules built on the fused ops: attention gates, candidate operations, the search cell, and the plans that
execute its node sums (:mod:`fastnas.nn.plans`)."""
from .attention import CBAM, ChannelAttention, SpatialAttention
from .operations import DilConv, FactorizedReduce, ReLUConvBN, SepConv, Zero
from .pooling import AvgPool2d, MaxPool2d
from .search_cell import SearchCell

__all__ = ["AvgPool2d", "CBAM", "ChannelAttention", "DilConv", "FactorizedReduce", "MaxPool2d", "ReLUConvBN",
           "SearchCell", "SepConv", "SpatialAttention", "Zero"]
