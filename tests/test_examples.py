"""The examples run: the reproduction at a tiny setting (seconds), its outputs, the CIFAR-10 loader, the scripts."""

from __future__ import annotations

import csv
import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from examples import reproduce  # noqa: E402

TINY = ["--epochs", "1", "--decouple-epochs", "2", "--seeds", "1", "--max-train", "128", "--width", "4", "--jobs", "1"]


def test_reproduce_tiny_writes_csv_markdown_and_plots(tmp_path, capsys):
    out = reproduce.main(TINY + ["--out", str(tmp_path / "out")])
    assert out == tmp_path / "out"
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    expected = {(exp, cfg.label) for exp, cfgs in reproduce.experiments("bfloat16").items() for cfg in cfgs}
    assert {(r["experiment"], r["variant"]) for r in rows} == expected
    assert len(rows) == len(expected)  # one seed
    for r in rows:
        assert 0.0 <= float(r["test_acc"]) <= 1.0
    md = (out / "results.md").read_text()
    decouple = [c for c in reproduce.experiments("bfloat16")["decouple"]]
    # column names, rule, one line per variant; then the decouple dynamics: column names, rule, one line per scheme
    assert md.count("\n|") == len(expected) + 2 + len(decouple) + 2
    assert sum(line.startswith("| wn") and "← tuned" in line for line in md.splitlines()) == 3  # one LR per method
    for exp in ("bn", "half", "decouple", "wn"):
        assert (out / f"{exp}_curves.png").stat().st_size > 1000
    assert (out / "decouple_dynamics.png").stat().st_size > 1000
    assert (out / "wn_lr_sweep.png").stat().st_size > 1000
    control = [r for r in rows if r["experiment"] == "decouple" and "control" in r["variant"]]
    assert len(control) == 1 and float(control[0]["final_norm"]) > 0
    printed = capsys.readouterr().out
    assert "results.csv" in printed and str(out.resolve()) in printed


def test_reproduce_seeds_and_subset(tmp_path):
    out = reproduce.main(TINY + ["--seeds", "2", "--experiments", "bn", "--out", str(tmp_path)])
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 and {r["seed"] for r in rows} == {"0", "1"}
    assert " ± " in (out / "results.md").read_text()
    with pytest.raises(SystemExit):
        reproduce.main(["--experiments", "nope", "--out", str(tmp_path)])


def test_reproduce_is_deterministic_and_independent_of_jobs(tmp_path):
    """The same command prints the same table; worker processes change nothing (each run has its own threads)."""
    args = TINY + ["--experiments", "decouple", "--seeds", "2", "--decouple-epochs", "1"]
    tables = []
    for jobs in ("1", "2"):
        out = reproduce.main(args + ["--jobs", jobs, "--out", str(tmp_path / jobs)])
        tables.append((out / "results.md").read_text().split("\n", 1)[1])  # all but the dated header line
    assert tables[0] == tables[1]


def test_wn_learning_rate_selection_uses_training_loss_only():
    rows = [{"experiment": "wn", "variant": f"M, lr {lr}", "train_loss": loss, "test_acc": acc}
            for lr, loss, acc in ((0.1, 0.5, 0.99), (0.3, 0.2, 0.50), (1.0, float("nan"), 0.99))]
    assert reproduce.select_wn_lrs(rows) == {"M": "M, lr 0.3"}


def test_random_shift_moves_images_within_the_padding():
    x = torch.zeros(5, 1, 12, 12)
    x[:, :, 5, 5] = 1.0
    shifted = reproduce.random_shift(x, torch.Generator().manual_seed(0), 2)
    assert shifted.shape == x.shape and torch.equal(shifted.sum((1, 2, 3)), x.sum((1, 2, 3)))
    rows, cols = shifted[:, 0].nonzero()[:, 1], shifted[:, 0].nonzero()[:, 2]
    assert ((rows - 5).abs() <= 2).all() and ((cols - 5).abs() <= 2).all()
    assert torch.equal(reproduce.random_shift(x, torch.Generator(), 0), x)


def _fake_cifar(folder, batches=(1, 2), n=6):
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in batches] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(range(n))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar10_loader_reads_the_pickle_folder(tmp_path):
    _fake_cifar(tmp_path)
    data = reproduce.load_cifar10(tmp_path)
    assert data.x_train.shape == (12, 3, 32, 32) and data.x_test.shape == (6, 3, 32, 32)
    assert data.y_train.tolist() == list(range(6)) * 2 and data.classes == 6
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    raw = pickle.load(open(tmp_path / "data_batch_1", "rb"))[b"data"]
    assert torch.equal(data.x_train[0, 1, 0, :], torch.tensor(raw[0, 1024:1056], dtype=torch.float32) / 255)
    assert reproduce.load_cifar10(tmp_path, max_train=5).x_train.shape[0] == 5
    with pytest.raises(FileNotFoundError):
        reproduce.load_cifar10(tmp_path / "missing")


def test_reproduce_runs_on_a_cifar_folder(tmp_path):
    _fake_cifar(tmp_path, n=10)
    out = reproduce.main(["--data-dir", str(tmp_path), "--experiments", "bn,half", "--epochs", "1", "--seeds",
                          "1", "--width", "4", "--jobs", "1", "--out", str(tmp_path / "out")])
    assert (out / "results.csv").exists()


def test_input_dtype_l2_batch_norm_overflows_in_fp16_only():
    layer = reproduce.InputDtypeL2BatchNorm(3)
    x = torch.randn(32, 3, 4, 4)
    ref = torch.nn.functional.batch_norm(x, None, None, training=True)
    assert torch.allclose(layer(x), ref, atol=1e-4)
    assert layer.half().running_var.dtype == torch.float32
    big = (x * 1000).half()
    assert not torch.isfinite(layer(big).float()).all() or (layer(big) == 0).all()  # the variance is inf
    assert torch.isfinite(layer.bfloat16()((x * 1000).bfloat16())).all()  # bf16 has float32's range


def test_plain_pytorch_example(capsys):
    from examples import plain_pytorch

    assert plain_pytorch.main(epochs=1) > 0.5
    assert "test accuracy" in capsys.readouterr().out


def test_lightning_example(tmp_path, capsys):
    pytest.importorskip("pytorch_lightning")
    from examples import lightning_example

    metrics = lightning_example.main(["--epochs", "2", "--out", str(tmp_path), "--no-progress-bar"])
    assert metrics["val_acc"] > 0.3
    assert any(k.startswith("effective_lr/") for k in metrics)
    assert "LinfBatchNorm2d" in capsys.readouterr().out
