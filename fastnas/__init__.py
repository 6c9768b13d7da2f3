"""fastnas: differentiable architecture search with attention operations, on fused kernels.

>>> import fastnas
>>> net = fastnas.SuperNet(C=16, layers=8, num_classes=10)          # the AT-DARTS search space
>>> with fastnas.ops.backend("cpu"):                                 # fused C++ kernels
...     logits = net(images)
>>> net.genotype()                                                   # a fastnas.Genotype
"""
from . import genotypes, nn, ops
from .costmodel import cost
from .errors import CheckpointError, ConfigError, DataError, FastNASError
from .evalnet import EvalNet, load_model
from .genotype import Genotype
from .nn.plans import Execution
from .predictor import Predictor
from .space import SPACES, register_op
from .supernet import SuperNet

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "DataError", "Execution", "FastNASError", "Genotype", "SPACES", "SuperNet",
           "genotypes", "nn", "ops", "register_op"]
__all__ += ["EvalNet", "Predictor", "load_model"]
__all__ += ["cost"]
