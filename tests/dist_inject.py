"""``python -m fastnas.search`` under torchrun with a fault injected on rank 1, for tests/test_distributed.py.

FASTNAS_TEST_INJECT=raise: rank 1 raises at its first architecture step, while rank 0 waits for it in a collective.
FASTNAS_TEST_INJECT=desync: rank 1 nudges one weight after its first epoch, which --verify-sync must report.
FASTNAS_TEST_INJECT=interrupt: every rank stops after the first epoch, as a job killed then would.
"""
import os
import sys

import torch

from fastnas import architect, search

if os.environ.get("RANK") == "1":
    mode = os.environ.get("FASTNAS_TEST_INJECT")
    if mode == "raise":
        def _fail(*args, **kwargs):
            raise RuntimeError("injected failure on rank 1")
        architect.Architect.step = _fail
    elif mode == "desync":
        train_epoch = search.Search.train_epoch

        def _nudged(self):
            meter = train_epoch(self)
            with torch.no_grad():
                next(iter(self.model.weight_parameters())).view(-1)[0] += 1e-6
            return meter
        search.Search.train_epoch = _nudged

if os.environ.get("FASTNAS_TEST_INJECT") == "interrupt":
    run = search.Search.run
    search.Search.run = lambda self, until_epoch=None: run(self, until_epoch=1)

sys.exit(search.main())
