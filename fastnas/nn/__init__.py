"""Modules built on the fused ops: attention gates, candidate operations, search and evaluation cells."""
from .attention import CBAM, ChannelAttention, SpatialAttention
from .operations import DilConv, FactorizedReduce, ReLUConvBN, SepConv, Zero
from .search_cell import SearchCell

__all__ = ["CBAM", "ChannelAttention", "DilConv", "FactorizedReduce", "ReLUConvBN", "SearchCell", "SepConv",
           "SpatialAttention", "Zero"]
