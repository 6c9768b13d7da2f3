"""Where and how a network will run: what the plan factory needs to know before the network is built."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import ops
from ...errors import ConfigError

COMPILE_SCOPES = (None, "regions", "model")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # the activations' dtype under each autocast mode
AMP_MODES = ("off", *AMP_DTYPES)


@dataclass(frozen=True)
class Execution:
    """The setting a search network runs in.

    ``device``: the device type; ``backend``: the fused-op backend selection (None: the selection current when the
    network is built); ``channels_last``: the activations' layout; ``amp``: autocast (``off``, ``bf16``, ``fp16``);
    ``dtype``: the parameters' dtype; ``compile``: ``torch.compile`` of the cells' regions, of the whole model, or
    none."""

    device: str = "cpu"
    backend: str | None = None
    channels_last: bool = False
    amp: str = "off"
    dtype: torch.dtype = torch.float32
    compile: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", torch.device(self.device).type)
        if self.amp not in AMP_MODES:
            raise ConfigError(f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        if self.compile not in COMPILE_SCOPES:
            raise ConfigError(f"compile must be None, 'regions' or 'model', got {self.compile!r}")

    @property
    def resolved_backend(self) -> str:
        """The concrete backend that ops on this device use under this setting's selection."""
        return ops.resolve_backend(self.device, self.backend)

    @property
    def activation_dtype(self) -> torch.dtype:
        return AMP_DTYPES.get(self.amp, self.dtype)
