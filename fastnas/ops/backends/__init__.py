"""The built-in backends with kernels: ``cpp`` registers ``cpu`` and ``cuda`` (the compiled library), ``triton``
registers ``triton``. Each registers through :func:`fastnas.ops.backend.register_backend` when imported."""
