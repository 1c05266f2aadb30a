"""Every docstring example of lightning_callbacks runs, and the Lightning page's example."""

import doctest
import importlib

import pytest

pytest.importorskip("pytorch_lightning")

MODULES = ["batchnorm_swap", "weight_norm_projection", "norm_scaled_lr", "weight_norm_monitor", "sync_plugin"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a Trainer may create lightning_logs/ in the working directory
    module = importlib.import_module(f"lightning_callbacks.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, raise_on_error=False)
    assert result.attempted > 0, f"{module.__name__} has no runnable example"
    assert result.failed == 0


def test_docs_lightning_example_runs(tmp_path, monkeypatch):
    # The first example of the Lightning page (docs/lightning.md), which was the README's.
    import pathlib
    import re

    monkeypatch.chdir(tmp_path)
    text = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "lightning.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "docs/lightning.md", "exec"), namespace)
    model = namespace["trainer"].lightning_module
    assert type(model.net[1]).__name__ == "L1BatchNorm1d"
