"""Synchronised L1/L∞ batch norm with real processes (2 ranks, gloo on CPU) against one process on the whole batch.

Two processes are spawned once for the whole module (start-up dominates the cost): the parent writes every
scenario's global data to a file, each rank runs its slice through the synchronised layer and saves what it
saw, and the tests compare that with the unsynchronised layer run in the parent on the concatenated batch.
"""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import normdecouple as nd
from normdecouple.batchnorm import L1BatchNormNd, LinfBatchNormNd
from _distributed_support import count_collectives
from _timm_support import BatchNormAct2d, BatchNormReLU2d, FixedChannelDrop, timm_convert_sync_batchnorm
from normdecouple.distributed import SyncL1BatchNorm, SyncLinfBatchNorm

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="needs torch.distributed with the gloo backend",
)

WORLD = 2
# The spawned ranks must finish well within this; a hang (a rank missing a collective) fails instead of
# blocking CI.
DEADLINE_S = 240.0
# float64: the synchronised and single-process runs differ only by the order of a few sums (measured < 1e-13).
TOL64 = {"atol": 1e-12, "rtol": 1e-11}
# (atol, rtol) per dtype: float32 by rounding of the per-rank partial sums; low precision by one rounding of
# the output and a mean combined from per-rank means instead of one blocked mean over the whole batch.
TOLS = {torch.float64: (1e-12, 1e-11), torch.float32: (2e-5, 2e-4), torch.float16: (4e-3, 4e-3),
        torch.bfloat16: (3e-2, 3e-2)}

# name -> settings. split: values of N on rank 0 and rank 1 (sum = global N); shape: global shape.
SCENARIOS = {
    # Equal per-rank batches, 4D, both norms (k=1 takes the max/min path, k=3 the top-k path).
    "l1_equal": dict(norm="l1", shape=(8, 3, 5, 4), split=(4, 4)),
    "linf1_equal": dict(norm="linf", k=1, shape=(8, 3, 5, 4), split=(4, 4)),
    "linf3_equal": dict(norm="linf", k=3, shape=(8, 3, 5, 4), split=(4, 4)),
    # Unequal batches (the last batch of an epoch), channels_last, cumulative average (momentum=None).
    "l1_unequal_cl": dict(norm="l1", shape=(7, 3, 4, 5), split=(5, 2), channels_last=True, momentum=None),
    # Eval without tracked statistics uses each rank's own batch statistics, unsynchronised (torch's rule).
    "linf1_unequal_untracked": dict(norm="linf", k=1, shape=(7, 3, 4, 5), split=(5, 2), channels_last=True,
                                    track=False),
    # (N, C) with one sample on rank 0: fewer than 2k values there (all sent), at least 2k on rank 1 (top-k).
    "linf3_one_sample": dict(norm="linf", k=3, shape=(8, 5), split=(1, 7)),
    # An empty rank takes part in every collective; no affine parameters.
    "l1_empty_rank": dict(norm="l1", shape=(6, 3, 4), split=(0, 6), affine=False),
    "linf3_empty_rank": dict(norm="linf", k=3, shape=(6, 2, 2, 3, 2), split=(6, 0)),
    "linf1_empty_rank": dict(norm="linf", k=1, shape=(8, 4), split=(0, 8)),
    # Every rank empty (torch's empty batch): empty outputs, running statistics untouched, batches counted.
    "l1_all_empty": dict(norm="l1", shape=(0, 3, 4), split=(0, 0)),
    "linf3_all_empty": dict(norm="linf", k=3, shape=(0, 2, 3), split=(0, 0)),
    # Ties at the k-th |d| spread over both ranks: the even share must use the global tie counts.
    "ties_k1": dict(norm="linf", k=1, shape=(8, 2), split=(3, 5), ties=True),
    "ties_k3": dict(norm="linf", k=3, shape=(8, 2), split=(3, 5), ties=True),
    # float32 (statistics accumulated in float32) and low precision (statistics in the input dtype).
    "l1_float32": dict(norm="l1", shape=(8, 3, 5, 4), split=(3, 5), dtype=torch.float32),
    "linf3_float32": dict(norm="linf", k=3, shape=(8, 3, 5, 4), split=(3, 5), dtype=torch.float32),
    "l1_lowp_bf16": dict(norm="l1", shape=(8, 3, 6, 5), split=(4, 4), dtype=torch.bfloat16, low_precision=True),
    "linf2_lowp_fp16": dict(norm="linf", k=2, shape=(8, 3, 6, 5), split=(5, 3), dtype=torch.float16,
                            low_precision=True),
    # BatchNorm subclasses converted by convert_batchnorm, then synchronised (issue 19, item 13). timm's
    # BatchNormAct2d (F.batch_norm, then drop, then act; the act in place on the norm's output, timm's default):
    # with a drop layer and unequal batches; L∞ top-k with a cumulative average, LeakyReLU and channels_last;
    # without activation (a residual branch's last norm) and an empty rank; untracked statistics (eval on each
    # rank's own batch); float32 and low precision (the activation out of place).
    "timm_l1_drop": dict(norm="l1", subclass=BatchNormAct2d, layer_kwargs=dict(drop_layer=FixedChannelDrop),
                         shape=(8, 3, 5, 4), split=(3, 5)),
    "timm_linf3_cumulative_cl": dict(norm="linf", k=3, subclass=BatchNormAct2d, momentum=None, channels_last=True,
                                     layer_kwargs=dict(act_layer=nn.LeakyReLU), shape=(7, 3, 4, 5), split=(5, 2)),
    "timm_linf1_noact_empty_rank": dict(norm="linf", k=1, subclass=BatchNormAct2d,
                                        layer_kwargs=dict(apply_act=False), shape=(6, 2, 3, 3), split=(0, 6)),
    "timm_l1_untracked": dict(norm="l1", subclass=BatchNormAct2d, track=False, shape=(6, 3, 2, 2), split=(4, 2)),
    "timm_linf2_float32": dict(norm="linf", k=2, subclass=BatchNormAct2d, dtype=torch.float32,
                               shape=(8, 3, 5, 4), split=(4, 4)),
    "timm_l1_lowp_bf16": dict(norm="l1", subclass=BatchNormAct2d, dtype=torch.bfloat16, low_precision=True,
                              layer_kwargs=dict(inplace=False), shape=(8, 3, 6, 5), split=(5, 3)),
    # relu(super().forward(x)): the synchronised layer's own forward, under the user's.
    "relu_super_linf2": dict(norm="linf", k=2, subclass=BatchNormReLU2d, shape=(8, 3, 5, 4), split=(4, 4)),
}
# Bad global batches: every rank must raise the same error at the same point, and the next scenario must
# still run (no rank left behind in a collective).
ERROR_SCENARIOS = {
    "err_one_value": dict(norm="l1", shape=(1, 3), split=(1, 0), match="more than 1 value per channel"),
    "err_k_too_large": dict(norm="linf", k=5, shape=(4, 3), split=(2, 2), match="k=5 exceeds the n=4"),
}
STEPS = 2  # two training steps: the running statistics must follow both updates


def _tie_batch() -> torch.Tensor:
    # Exact zero mean; channel 0: |d| = 2 four times (ranks 0 and 1), the maximum for k=1, inside the top 3;
    # channel 1: 3 above, then 2 three times (rank 0 once, rank 1 twice) sharing the 2 remaining places.
    channel0 = [-2.0, 1.0, 2.0, 0.0, -2.0, -1.0, 2.0, 0.0]
    channel1 = [-3.0, 1.0, 2.0, 0.0, -2.0, -1.0, 2.0, 1.0]
    return torch.tensor([channel0, channel1], dtype=torch.float64).T.contiguous()


def _layer(cfg: dict, sync: bool) -> nn.Module:
    kwargs = dict(momentum=cfg.get("momentum", 0.1), affine=cfg.get("affine", True),
                  track_running_stats=cfg.get("track", True), low_precision=cfg.get("low_precision", False))
    channels = cfg["shape"][1]
    if "subclass" in cfg:
        # The user's layer, converted as a user does: convert_batchnorm, then convert_sync_batchnorm.
        low_precision = kwargs.pop("low_precision")
        user = cfg["subclass"](channels, **kwargs, **cfg.get("layer_kwargs", {}))
        norm_kwargs = {"k": cfg["k"]} if cfg["norm"] == "linf" else {}
        layer = nd.convert_batchnorm(user, cfg["norm"], low_precision=low_precision, **norm_kwargs)
        return nd.convert_sync_batchnorm(layer) if sync else layer
    if cfg["norm"] == "l1":
        return (SyncL1BatchNorm if sync else L1BatchNormNd)(channels, **kwargs)
    return (SyncLinfBatchNorm if sync else LinfBatchNormNd)(channels, k=cfg.get("k", 1), **kwargs)


def _make_data(cfg: dict) -> dict:
    dtype = cfg.get("dtype", torch.float64)
    channels = cfg["shape"][1]
    xs, grads = [], []
    for _ in range(STEPS):
        x = _tie_batch() if cfg.get("ties") else 2.0 + 3.0 * torch.randn(cfg["shape"], dtype=torch.float64)
        xs.append(x.to(dtype))
        grads.append(torch.randn(cfg["shape"], dtype=torch.float64).to(dtype))
    layer = _layer(cfg, sync=False)
    with torch.no_grad():
        if layer.affine:
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.normal_()
        if layer.running_mean is not None:
            layer.running_mean.normal_()
            layer.running_var.uniform_(0.5, 1.5)
    layer.to(dtype)
    return {"xs": xs, "grads": grads, "state": layer.state_dict(), "channels": channels}


def _slice(t: torch.Tensor, split: tuple[int, int], rank: int, channels_last: bool) -> torch.Tensor:
    start = sum(split[:rank])
    part = t[start:start + split[rank]].clone()
    return part.to(memory_format=torch.channels_last) if channels_last else part


def _run_scenario(cfg: dict, data: dict, rank: int) -> dict:
    layer = _layer(cfg, sync=True)
    layer.to(cfg.get("dtype", torch.float64))
    layer.load_state_dict(data["state"])
    out = {"ys": [], "grad_xs": [], "grad_ws": [], "grad_bs": [], "collectives": None}
    for step in range(STEPS):
        x = _slice(data["xs"][step], cfg["split"], rank, cfg.get("channels_last", False)).requires_grad_()
        grad = _slice(data["grads"][step], cfg["split"], rank, cfg.get("channels_last", False))
        forward_count, backward_count = [0], [0]
        with count_collectives(forward_count):
            y = layer(x)
        with count_collectives(backward_count):
            y.backward(grad)
        if step == 0:
            out["collectives"] = (forward_count[0], backward_count[0])
        out["ys"].append(y.detach())
        out["grad_xs"].append(x.grad)
        if layer.affine:
            out["grad_ws"].append(layer.weight.grad.clone())
            out["grad_bs"].append(layer.bias.grad.clone())
            layer.weight.grad = layer.bias.grad = None
    out["channels_last_kept"] = y.is_contiguous(memory_format=torch.channels_last)
    out["buffers"] = {name: b.clone() for name, b in layer.named_buffers()}
    layer.eval()
    x = _slice(data["xs"][0], cfg["split"], rank, cfg.get("channels_last", False))
    out["eval"] = layer(x).detach() if x.shape[0] > 0 or cfg.get("track", True) else None
    out["training_after_eval"] = layer.training
    return out


class _Net(nn.Module):
    """Conv -> L1 BN -> ReLU -> 1x1 conv -> top-k L∞ BN -> ReLU -> pooled linear head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nd.L1BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                                  nd.LinfBatchNorm2d(4, k=2), nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)))


DDP_STEPS, DDP_LR, DDP_BATCH = 3, 0.1, (8, 3, 6, 6)


def _ddp_data() -> dict:
    model = _Net().double()
    batches = [(torch.randn(DDP_BATCH, dtype=torch.float64), torch.randn(DDP_BATCH[0], 2, dtype=torch.float64))
               for _ in range(DDP_STEPS)]
    return {"state": model.state_dict(), "batches": batches}


def _run_ddp(data: dict, rank: int) -> dict:
    model = _Net().double()
    model.load_state_dict(data["state"])
    model = nd.convert_sync_batchnorm(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=DDP_LR)
    half = DDP_BATCH[0] // WORLD
    for x, target in data["batches"]:
        optimizer.zero_grad()
        part = slice(rank * half, (rank + 1) * half)
        # Equal per-rank batches: DDP's average of per-rank mean losses is the global mean loss.
        loss = nn.functional.mse_loss(ddp(x[part]), target[part])
        loss.backward()
        optimizer.step()
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


class _TimmNet(nn.Module):
    """An EfficientNet-like block of timm-style layers: stem conv -> BatchNormAct2d (SiLU in place) -> depthwise
    conv -> BatchNormAct2d (drop, ReLU in place) -> 1x1 conv -> BatchNormAct2d without activation, plus the
    residual -> relu(super().forward()) layer -> pooled linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, bias=False)
        self.bn1 = BatchNormAct2d(4, act_layer=nn.SiLU)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.bn2 = BatchNormAct2d(4, drop_layer=FixedChannelDrop)
        self.pw = nn.Conv2d(4, 4, 1, bias=False)
        self.bn3 = BatchNormAct2d(4, apply_act=False)
        self.bn4 = BatchNormReLU2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.bn1(self.stem(x))
        h = self.bn3(self.pw(self.bn2(self.dw(h)))) + h
        return self.head(self.bn4(h).mean(dim=(2, 3)))


TIMM_NORMS = {"l1": {}, "linf": {"k": 2}}
TIMM_LAYERS = ("bn1", "bn2", "bn3", "bn4")


def _timm_data() -> dict:
    model = _TimmNet().double()
    with torch.no_grad():
        for name in TIMM_LAYERS:
            getattr(model, name).weight.uniform_(0.5, 1.5)
            getattr(model, name).bias.normal_()
    batches = [(2.0 + torch.randn(DDP_BATCH, dtype=torch.float64), torch.randn(DDP_BATCH[0], 2, dtype=torch.float64))
               for _ in range(DDP_STEPS)]
    return {"state": model.state_dict(), "batches": batches, "eval_x": torch.randn(DDP_BATCH, dtype=torch.float64)}


def _train_timm(model: nn.Module, batches: list, part: slice | None = None) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=DDP_LR, momentum=0.9)
    for x, target in batches:
        optimizer.zero_grad()
        x, target = (x, target) if part is None else (x[part], target[part])
        nn.functional.mse_loss(model(x), target).backward()
        optimizer.step()


def _run_timm_ddp(data: dict, rank: int) -> dict:
    """The path a timm user takes: convert_batchnorm, convert_sync_batchnorm, DDP; afterwards revert to timm's
    classes (export, single-process evaluation)."""
    out = {}
    for norm, norm_kwargs in TIMM_NORMS.items():
        model = _TimmNet().double()
        model.load_state_dict(data["state"])
        acts = {name: getattr(model, name).act for name in TIMM_LAYERS[:3]}
        model = nd.convert_sync_batchnorm(nd.convert_batchnorm(model, norm, **norm_kwargs))
        synced = {name: (type(getattr(model, name)).__mro__[1],
                         [c for c in (SyncL1BatchNorm, SyncLinfBatchNorm) if isinstance(getattr(model, name), c)])
                  for name in TIMM_LAYERS}
        half = DDP_BATCH[0] // WORLD
        _train_timm(nn.parallel.DistributedDataParallel(model), data["batches"], slice(rank * half, (rank + 1) * half))
        trained = {name: t.detach().clone() for name, t in model.state_dict().items()}
        reverted = nd.revert_batchnorm(nd.revert_sync_batchnorm(model))
        out[norm] = {
            "state": trained,
            "synced_bases": synced,
            "reverted_types": {name: type(getattr(reverted, name)) for name in TIMM_LAYERS},
            "acts_kept": all(getattr(reverted, name).act is act for name, act in acts.items()),
            "reverted_state_equal": all(torch.equal(t, trained[name]) for name, t in reverted.state_dict().items()),
            "eval": reverted.eval()(data["eval_x"]).detach(),
        }
    return out


def _worker(rank: int, store_path: str, data_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # two ranks on a shared 2-core machine
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    try:
        data = torch.load(data_path, weights_only=False)
        results: dict = {"scenarios": {}, "errors": {}}
        for name, cfg in SCENARIOS.items():
            results["scenarios"][name] = _run_scenario(cfg, data["scenarios"][name], rank)
            if name == "linf1_equal":
                # Errors in the middle: the scenarios after them must still run on both ranks.
                for err_name, err_cfg in ERROR_SCENARIOS.items():
                    x = _slice(data["errors"][err_name], err_cfg["split"], rank, False)
                    try:
                        _layer(err_cfg, sync=True).double()(x)
                        results["errors"][err_name] = None
                    except ValueError as error:
                        results["errors"][err_name] = str(error)
        results["ddp"] = _run_ddp(data["ddp"], rank)
        results["timm_ddp"] = _run_timm_ddp(data["timm_ddp"], rank)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    torch.manual_seed(1234)
    data = {
        "scenarios": {name: _make_data(cfg) for name, cfg in SCENARIOS.items()},
        "errors": {name: torch.randn(cfg["shape"], dtype=torch.float64) for name, cfg in ERROR_SCENARIOS.items()},
        "ddp": _ddp_data(),
        "timm_ddp": _timm_data(),
    }
    data_path = tmp / "data.pt"
    torch.save(data, data_path)
    start = time.monotonic()
    context = mp.spawn(_worker, args=(str(tmp / "store"), str(data_path), str(tmp)), nprocs=WORLD, join=False)
    while not context.join(timeout=1.0):
        if time.monotonic() - start > DEADLINE_S:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} ranks did not finish within {DEADLINE_S} s (a rank hung in a collective?)")
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return data, ranks


def _single_process(cfg: dict, data: dict) -> dict:
    layer = _layer(cfg, sync=False)
    layer.to(cfg.get("dtype", torch.float64))
    layer.load_state_dict(data["state"])
    out = {"ys": [], "grad_xs": [], "grad_ws": [], "grad_bs": []}
    for step in range(STEPS):
        x = data["xs"][step].clone().requires_grad_()
        y = layer(x)
        y.backward(data["grads"][step])
        out["ys"].append(y.detach())
        out["grad_xs"].append(x.grad)
        if layer.affine:
            out["grad_ws"].append(layer.weight.grad.clone())
            out["grad_bs"].append(layer.bias.grad.clone())
            layer.weight.grad = layer.bias.grad = None
    out["buffers"] = {name: b.clone() for name, b in layer.named_buffers()}
    layer.eval()
    out["eval_layer"] = layer
    return out


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    atol, rtol = TOLS[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_matches_single_process_on_global_batch(dist_results, name):
    data, ranks = dist_results
    cfg, scenario = SCENARIOS[name], data["scenarios"][name]
    dtype = cfg.get("dtype", torch.float64)
    ours = [r["scenarios"][name] for r in ranks]
    single = _single_process(cfg, scenario)
    for step in range(STEPS):
        # Outputs and input gradients: the ranks' slices, concatenated, are the single process's.
        _close(torch.cat([o["ys"][step] for o in ours]), single["ys"][step], dtype)
        grad_x = single["grad_xs"][step]
        grad_scale = grad_x.abs().max().item() + 1.0 if grad_x.numel() else 1.0
        _close(torch.cat([o["grad_xs"][step] for o in ours]), grad_x, dtype, grad_scale)
        # Parameter gradients: each rank's share; their sum (what DDP's all-reduce forms) is the whole.
        for key in ("grad_ws", "grad_bs"):
            if single[key]:
                total = single[key][step]
                _close(sum(o[key][step] for o in ours), total, dtype, total.abs().max().item() + 1.0)
    # Running statistics and num_batches_tracked after both steps, the same on every rank.
    for o in ours:
        assert o["buffers"].keys() == single["buffers"].keys()
        for key, expected in single["buffers"].items():
            if key == "num_batches_tracked":
                assert torch.equal(o["buffers"][key], expected)
            else:
                assert o["buffers"][key].dtype == expected.dtype
                _close(o["buffers"][key], expected, dtype)
    # Eval: the unsynchronised layer on each rank's slice (running statistics, or local batch statistics).
    for rank, o in enumerate(ours):
        if o["eval"] is None:
            continue
        x = _slice(scenario["xs"][0], cfg["split"], rank, cfg.get("channels_last", False))
        expected = single["eval_layer"](x) if cfg.get("track", True) else _local_batch_eval(cfg, scenario, x)
        _close(o["eval"], expected.detach(), dtype)
        assert not o["training_after_eval"]
    if cfg.get("channels_last"):
        assert all(o["channels_last_kept"] for o in ours if o["ys"][-1].shape[0] > 1)


def _local_batch_eval(cfg: dict, scenario: dict, x: torch.Tensor) -> torch.Tensor:
    layer = _layer(cfg, sync=False).to(cfg.get("dtype", torch.float64))
    layer.load_state_dict(scenario["state"])
    return layer.eval()(x)


def test_running_statistics_identical_on_every_rank(dist_results):
    _, ranks = dist_results
    for name in SCENARIOS:
        first, second = (r["scenarios"][name]["buffers"] for r in ranks)
        for key in first:
            assert torch.equal(first[key], second[key]), (name, key)


def test_collectives_per_layer(dist_results):
    # The counts the docstrings state: L1 forward 2 all-reduces, L∞ forward 1 all-gather, backward 1
    # all-reduce; an empty rank makes the same calls.
    _, ranks = dist_results
    for name, cfg in SCENARIOS.items():
        expected = (2, 1) if cfg["norm"] == "l1" else (1, 1)
        for r in ranks:
            assert r["scenarios"][name]["collectives"] == expected, name


def test_bad_global_batch_raises_on_every_rank_without_hanging(dist_results):
    # The scenarios after the errors ran (the fixture completed), so no rank was left in a collective.
    _, ranks = dist_results
    for name, cfg in ERROR_SCENARIOS.items():
        for r in ranks:
            message = r["errors"][name]
            assert message is not None, f"{name}: no error raised"
            assert cfg["match"] in message


def test_ddp_training_matches_single_process(dist_results):
    data, ranks = dist_results
    model = _Net().double()
    model.load_state_dict(data["ddp"]["state"])
    optimizer = torch.optim.SGD(model.parameters(), lr=DDP_LR)
    for x, target in data["ddp"]["batches"]:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), target).backward()
        optimizer.step()
    expected = model.state_dict()
    moved = False
    for r in ranks:
        assert r["ddp"].keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(r["ddp"][key], value, **TOL64)
            moved = moved or not torch.equal(value, data["ddp"]["state"][key])
    assert moved


def test_synchronised_subclass_keeps_its_activation_and_drop(dist_results):
    # The comparison above is with the unsynchronised converted layer; here, directly: the drop layer zeroed
    # channel 1 and ReLU clipped the rest, on the synchronised path (a layer without act keeps negatives).
    _, ranks = dist_results
    y = torch.cat([r["scenarios"]["timm_l1_drop"]["ys"][0] for r in ranks])
    assert torch.equal(y[:, 1], torch.zeros_like(y[:, 1])) and y.min() == 0 and y.max() > 0
    y = torch.cat([r["scenarios"]["timm_linf1_noact_empty_rank"]["ys"][0] for r in ranks])
    assert y.min() < 0


@pytest.mark.parametrize("norm", list(TIMM_NORMS))
def test_ddp_training_of_timm_style_model_matches_single_process(dist_results, norm):
    data, ranks = dist_results
    data = data["timm_ddp"]
    model = _TimmNet().double()
    model.load_state_dict(data["state"])
    model = nd.convert_batchnorm(model, norm, **TIMM_NORMS[norm])
    _train_timm(model, data["batches"])
    expected = model.state_dict()
    reverted = nd.revert_batchnorm(model).eval()
    expected_eval = reverted(data["eval_x"])
    sync_class = SyncL1BatchNorm if norm == "l1" else SyncLinfBatchNorm
    for r in ranks:
        ours = r["timm_ddp"][norm]
        # Synchronised forms: the user's class first, then the synchronised layer of the norm.
        assert ours["synced_bases"] == {"bn1": (BatchNormAct2d, [sync_class]), "bn2": (BatchNormAct2d, [sync_class]),
                                        "bn3": (BatchNormAct2d, [sync_class]), "bn4": (BatchNormReLU2d, [sync_class])}
        assert ours["state"].keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(ours["state"][key], value, **TOL64, msg=key)
        # Reverted to the user's classes with the trained state exactly and the same act modules.
        assert ours["reverted_types"] == {"bn1": BatchNormAct2d, "bn2": BatchNormAct2d, "bn3": BatchNormAct2d,
                                          "bn4": BatchNormReLU2d}
        assert ours["acts_kept"] and ours["reverted_state_equal"]
        torch.testing.assert_close(ours["eval"], expected_eval.detach(), **TOL64)
    assert not torch.equal(expected["bn2.running_var"], data["state"]["bn2.running_var"])


# Everything below runs in the test process itself, without a process group.


@pytest.fixture
def no_process_group():
    if dist.is_initialized():
        pytest.skip("a default process group is initialised in the test process")


@pytest.mark.parametrize("cls", [SyncL1BatchNorm, SyncLinfBatchNorm])
def test_training_without_process_group_raises(no_process_group, cls):
    layer = cls(3)
    with pytest.raises(RuntimeError, match=r"init_process_group"):
        layer(torch.randn(4, 3, 2))
    # The error comes before anything is counted or updated.
    assert int(layer.num_batches_tracked) == 0
    assert torch.equal(layer.running_mean, torch.zeros(3))


@pytest.mark.parametrize("cls,plain", [(SyncL1BatchNorm, L1BatchNormNd), (SyncLinfBatchNorm, LinfBatchNormNd)])
def test_eval_without_process_group_is_the_unsynchronised_layer(no_process_group, cls, plain):
    layer, reference = cls(3), plain(3)
    with torch.no_grad():
        for module in (layer, reference):
            module.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
            module.running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
    x = torch.randn(4, 3, 2, 5)
    torch.testing.assert_close(layer.eval()(x), reference.eval()(x))


def test_rank_and_channel_errors(no_process_group):
    layer = SyncL1BatchNorm(3)
    with pytest.raises(ValueError, match=r"expected at least 2D input \(got 1D input\)"):
        layer(torch.randn(3))
    with pytest.raises(ValueError, match="input channels should be non-zero"):
        SyncL1BatchNorm(0)(torch.randn(2, 0))


def test_torch_converter_turns_our_layers_into_l2(no_process_group):
    # The hazard this module exists for: torch's converter accepts any _BatchNorm subclass and returns its
    # own SyncBatchNorm, whose statistics are L2. Without a process group it falls back to local L2 batch
    # norm, which shows the change of norm on CPU.
    for ours in (nd.L1BatchNorm2d(4), nd.LinfBatchNorm2d(4, k=2), SyncL1BatchNorm(4)):
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(ours))[0]
        assert type(converted) is nn.SyncBatchNorm
        x = torch.randn(8, 4, 3, 3)
        torch.testing.assert_close(converted.train()(x), nn.functional.batch_norm(x, None, None, training=True))
        assert not torch.allclose(converted(x), nd.L1BatchNorm2d(4)(x), atol=1e-3)


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nd.L1BatchNorm2d(4, momentum=None, low_precision=True)
        self.seq = nn.Sequential(nd.LinfBatchNorm1d(5, k=3, eps=1e-3, affine=False), nn.BatchNorm1d(5))
        self.vol = nd.L1BatchNorm3d(2, track_running_stats=False, bias=False)


def test_convert_revert_round_trip_keeps_everything(no_process_group):
    model = _Model()
    model.bn.running_mean.normal_()
    model.bn.num_batches_tracked.fill_(7)
    model.seq[0].eval()
    before = copy.deepcopy(model)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    group = object()  # any value is stored as given; it is only used in a synchronised training call
    converted = nd.convert_sync_batchnorm(model, process_group=group)
    assert converted is model
    assert type(converted.bn) is SyncL1BatchNorm and type(converted.seq[0]) is SyncLinfBatchNorm
    assert type(converted.vol) is SyncL1BatchNorm and type(converted.seq[1]) is nn.BatchNorm1d
    assert converted.bn.process_group is group and converted.seq[0].k == 3
    assert converted.bn.low_precision and converted.bn.momentum is None and converted.seq[0].eps == 1e-3
    assert converted.vol.bias is None and converted.vol.running_mean is None
    assert not converted.seq[0].training and converted.bn.training

    for stage in (converted, nd.revert_sync_batchnorm(converted)):
        for name, p in stage.named_parameters():
            assert p is params[name]
        for name, b in stage.named_buffers():
            assert b is buffers[name]
        assert stage.state_dict().keys() == before.state_dict().keys()
        for (name, a), b in zip(stage.named_modules(), before.modules()):
            assert a.training == b.training, name
    reverted = converted
    for name in ("bn", "vol"):
        assert type(getattr(reverted, name)) is type(getattr(before, name))
    assert type(reverted.seq[0]) is nd.LinfBatchNorm1d and reverted.seq[0].k == 3
    assert repr(reverted) == repr(before)
    x = torch.randn(4, 3, 6, 6)
    reverted.eval()
    before.eval()
    torch.testing.assert_close(reverted.bn(reverted.conv(x)), before.bn(before.conv(x)))


def test_root_layer_is_replaced_and_directly_built_layers_revert_to_any_rank(no_process_group):
    root = nd.LinfBatchNorm3d(2, k=2)
    converted = nd.convert_sync_batchnorm(root)
    assert type(converted) is SyncLinfBatchNorm and converted.weight is root.weight
    assert type(nd.revert_sync_batchnorm(converted)) is nd.LinfBatchNorm3d
    # Re-converting a synchronised layer keeps the class to revert to and takes the new group.
    again = nd.convert_sync_batchnorm(converted, process_group="g")
    assert again.process_group == "g" and type(nd.revert_sync_batchnorm(again)) is nd.LinfBatchNorm3d
    assert type(nd.revert_sync_batchnorm(SyncL1BatchNorm(3))) is L1BatchNormNd
    assert type(nd.revert_sync_batchnorm(SyncLinfBatchNorm(3, k=2))) is LinfBatchNormNd
    assert math.isclose(nd.revert_sync_batchnorm(SyncLinfBatchNorm(3, k=2, eps=1e-3)).eps, 1e-3)
