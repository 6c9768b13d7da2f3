"""Modules built on the fused ops: attention gates, candidate operations, search and evaluation cells."""
from .attention import CBAM, ChannelAttention, SpatialAttention
from .operations import DilConv, FactorizedReduce, ReLUConvBN, SepConv, Zero
from .pooling import AvgPool2d, MaxPool2d
from .search_cell import SearchCell

__all__ = ["AvgPool2d", "CBAM", "ChannelAttention", "DilConv", "FactorizedReduce", "MaxPool2d", "ReLUConvBN",
           "SearchCell", "SepConv", "SpatialAttention", "Zero"]
