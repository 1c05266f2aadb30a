"""The documentation runs: every docstring example of the public modules, and the README's quickstart."""

import doctest
import pathlib
import re

import pytest

import normdecouple._constants
import normdecouple.batchnorm
import normdecouple.convert
import normdecouple.distributed
import normdecouple.functional
import normdecouple.optim.norm_scaled_lr
import normdecouple.optim.projection
import normdecouple.scale_invariance
import normdecouple.weight_norm

MODULES = [
    normdecouple._constants,
    normdecouple.batchnorm,
    normdecouple.convert,
    normdecouple.distributed,
    normdecouple.functional,
    normdecouple.optim.norm_scaled_lr,
    normdecouple.optim.projection,
    normdecouple.scale_invariance,
    normdecouple.weight_norm,
]
README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, raise_on_error=False)
    assert result.attempted > 0, f"{module.__name__} has no runnable example"
    assert result.failed == 0


@pytest.mark.parametrize("heading", ["## Quickstart", "### Decoupling the weight norm"])
def test_readme_examples_run(heading):
    text = README.read_text()
    section = text[text.index(heading):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, str(README), "exec"), {})
