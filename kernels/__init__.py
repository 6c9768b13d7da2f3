"""Triton kernels of fastnas, installed as ``fastnas.kernels``; the ``triton`` backend of :mod:`fastnas.ops` runs them.

One module per kernel family, each with its ``@triton.jit`` kernels, their launchers and the block-size choice:

- :mod:`.mixed_sum` — Σ_k w[k]·xs[k] and its backward (flat elementwise, per-program partial sums for grad w);
- :mod:`.pooling` — channel_pool and spatial_pool (mean, max and first argmax along one axis) and their backward;
- :mod:`.scale` — channel_scale and spatial_scale (x · sigmoid(logits)) and their backward (per-program partial sums
  for grad logits);
- :mod:`._common` — layout views, launch-size choice and the ordered reduction of partial sums;
- :mod:`._aot` — ahead-of-time compilation of every launch for a GPU target (``python -m fastnas.kernels._aot``);
- :mod:`.bench` — forward + backward bandwidth of each op against the device copy (``python -m fastnas.kernels.bench``).

Math is fp32 (fp64 for fp64 inputs); results are cast to the input dtype. No kernel uses float atomics.
"""
