"""Test support for the synchronised layers: counting the collectives a call makes.

Shared by tests/test_distributed.py and benchmarks/bn_sync.py (which puts this folder on ``sys.path``); not part
of the library, because it monkeypatches ``torch.distributed`` while it is active.
"""

import contextlib
from collections.abc import Iterator

import torch.distributed as dist

# The collectives of torch.distributed that count_collectives wraps.
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_single", "all_gather_into_tensor", "broadcast",
                "reduce_scatter_tensor", "all_to_all_single")


@contextlib.contextmanager
def count_collectives(counter: list[int]) -> Iterator[None]:
    """Counts, into ``counter[0]``, the ``torch.distributed`` collectives called inside the block.

    A diagnostic for the "collectives per layer" of the docs (the tests and ``benchmarks/bn_sync.py`` use it):
    it wraps the module-level functions of ``torch.distributed`` for the duration of the block.
    """
    originals = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

    def wrap(fn):
        def counted(*args, **kwargs):
            counter[0] += 1
            return fn(*args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
