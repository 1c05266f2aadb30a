"""Synchronised L1/L∞ BatchNorm on 2 CPU processes (gloo): collectives per layer and the cost of synchronising.

For each shape (the per-process batch) and norm, both processes time a forward+backward of the unsynchronised
layer (``L1BatchNorm2d``, ``LinfBatchNorm2d``) and of its synchronised counterpart (``SyncL1BatchNorm``,
``SyncLinfBatchNorm``) on their own half of the global batch. Times are rank 0's medians over interleaved
repeats (the variants take turns, each process with one thread), so machine noise hits them alike; the
ratio is the price of synchronisation. A third variant, "alone", runs the synchronised arithmetic over a group
of one process: the compute without any waiting for the peer. The collectives are counted by wrapping
``torch.distributed``'s functions during one call.

    python benchmarks/bn_sync.py                # the table (under a minute on 2 cores)
    python benchmarks/bn_sync.py --repeats 5    # quicker, noisier
    python benchmarks/bn_sync.py --processes 1  # one process: "alone" vs "unsync" is the arithmetic alone
                                                # (a group of one falls back to the unsynchronised layer)

References: arXiv:1803.01814
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import normdecouple as nd
from normdecouple.distributed import SyncLpBatchNormFunction

# The collective counter is a test helper (it monkeypatches torch.distributed), not part of the library.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from _distributed_support import count_collectives  # noqa: E402

# Per-process (N, C, H, W): ResNet-like channel counts, batches scaled down for a CPU.
SHAPES = [(8, 64, 32, 32), (8, 128, 16, 16), (16, 256, 8, 8), (32, 512, 4, 4)]
VARIANTS = {
    "L1": (lambda c: nd.L1BatchNorm2d(c), lambda c: nd.SyncL1BatchNorm(c)),
    "Linf k=1": (lambda c: nd.LinfBatchNorm2d(c, k=1), lambda c: nd.SyncLinfBatchNorm(c, k=1)),
    "Linf k=8": (lambda c: nd.LinfBatchNorm2d(c, k=8), lambda c: nd.SyncLinfBatchNorm(c, k=8)),
}


def collectives(layer: torch.nn.Module, x: torch.Tensor) -> tuple[int, int]:
    forward, backward = [0], [0]
    x = x.detach().requires_grad_()
    with count_collectives(forward):
        y = layer(x)
    with count_collectives(backward):
        y.backward(torch.ones_like(y))
    return forward[0], backward[0]


def fwd_bwd(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    x = x.detach().requires_grad_()
    start = time.perf_counter()
    layer(x).backward(grad)
    return time.perf_counter() - start


class AloneSync(torch.nn.Module):
    """The synchronised layer's arithmetic over a group of this process alone: its compute without waiting."""

    def __init__(self, layer: torch.nn.Module, group) -> None:
        super().__init__()
        self.layer, self.group = layer, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        return SyncLpBatchNormFunction.apply(x, layer.weight, layer.bias, layer.eps, layer.norm,
                                             getattr(layer, "k", 1), layer.low_precision, self.group, 1)[0]


def worker(rank: int, world: int, store: str, repeats: int, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    # Every process must create every group; each keeps the one holding itself.
    alone = [dist.new_group([r]) for r in range(world)][rank]
    torch.manual_seed(rank)
    rows = []
    try:
        # The floor of any synchronised layer: one small all-reduce between the two processes.
        probe = torch.zeros(2 * 64 + 1, dtype=torch.float64)
        latency = []
        for _ in range(10 * repeats):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(probe)
            latency.append(time.perf_counter() - start)
        rows.append(statistics.median(latency))
        for shape in SHAPES:
            x = torch.randn(shape)
            grad = torch.randn(shape)
            for name, (plain, sync) in VARIANTS.items():
                layers = {"unsync": plain(shape[1]), "sync": sync(shape[1])}
                layers["alone"] = AloneSync(sync(shape[1]), alone)
                counts = collectives(layers["sync"], x)
                times: dict[str, list[float]] = {key: [] for key in layers}
                names = list(layers)
                for round_ in range(repeats + 2):
                    order = names[round_ % len(names):] + names[: round_ % len(names)]
                    for key in order:
                        # Start both processes together, so the synchronised time is not a wait for the peer.
                        dist.barrier()
                        elapsed = fwd_bwd(layers[key], x, grad)
                        if round_ >= 2:  # two warm-up rounds
                            times[key].append(elapsed)
                medians = {key: statistics.median(values) for key, values in times.items()}
                rows.append((shape, name, counts, medians["unsync"], medians["alone"], medians["sync"]))
        if rank == 0:
            queue.put(rows)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--processes", type=int, default=2, help="ranks (keep 2 on a 2-core machine)")
    args = parser.parse_args(argv)
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(args.processes, f"{tmp}/store", args.repeats, queue), nprocs=args.processes,
                 join=True)
    latency, *rows = queue.get()
    print(f"torch {torch.__version__}, {args.processes} process(es) x 1 thread, gloo, float32, median of {args.repeats} "
          "interleaved fwd+bwd repeats (rank 0); ratio = synchronised / unsynchronised time")
    print(f"one all_reduce of {2 * 64 + 1} float64 values: {latency * 1e3:.3f} ms (median)")
    print("'alone': the synchronised arithmetic over a group of one process (compute only, no waiting)")
    header = (f"{'shape per process':<20}{'norm':<10}{'coll. fwd/bwd':>14}{'unsync ms':>11}{'alone ms':>10}"
              f"{'sync ms':>10}{'ratio':>8}")
    print(header)
    print("-" * len(header))
    for shape, name, (fwd, bwd), unsync, alone_ms, sync in rows:
        print(f"{str(shape):<20}{name:<10}{f'{fwd} / {bwd}':>14}{unsync * 1e3:>11.2f}{alone_ms * 1e3:>10.2f}"
              f"{sync * 1e3:>10.2f}{sync / unsync:>8.2f}")


if __name__ == "__main__":
    main()
