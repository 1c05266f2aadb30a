"""The documentation runs: every docstring example of the public modules, and the README, the front door.

The README's quickstart runs here; the blocks of the site's pages (``docs/``), where the README's former sections
now live, run in ``tests/test_docs_site.py``. The README and the Getting started page must say the same commands
and quickstart, and the README must link every page of the site.
"""

import doctest
import pathlib
import re

import pytest
import torch

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
ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
GETTING_STARTED = ROOT / "docs" / "getting-started.md"


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, raise_on_error=False)
    assert result.attempted > 0, f"{module.__name__} has no runnable example"
    assert result.failed == 0


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def test_readme_quickstart_runs():
    text = README.read_text()
    section = text[text.index("## Quickstart"):]
    code = _blocks(section, "python")[0]
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    model = namespace["model"]
    assert all(type(m) is not normdecouple.L1BatchNorm2d for m in model.modules())  # reverted for export
    weight = model[0].weight
    torch.testing.assert_close(torch.linalg.vector_norm(weight, dim=(1, 2, 3)), torch.ones(16))  # the hook's radius


def test_readme_has_one_python_block():
    # The front door's only Python is the quickstart; every other example is on a page, where it runs.
    assert len(_blocks(README.read_text(), "python")) == 1


def test_readme_ci_command_installs_torch_first():
    # .ci/run runs the first ```bash block after the marker: a fresh venv, torch pinned first, then the test extra.
    text = README.read_text()
    after = text[text.index("<!-- ci:test -->"):]
    command = _blocks(after, "bash")[0].strip()
    assert "\n" not in command
    steps = [step.strip() for step in command.split("&&")]
    assert steps[0] == "python3 -m venv .venv" and steps[1] == ". .venv/bin/activate"
    assert steps[2] == "pip install torch==2.13.0"
    assert steps[3] == 'pip install ".[test]"' and steps[-1] == "python -m pytest -q"


def test_getting_started_says_what_the_readme_says():
    # The two commands and the quickstart are in both places: the page must not drift from the front door.
    readme, page = README.read_text(), GETTING_STARTED.read_text()
    for command in _blocks(readme, "bash"):
        assert command in _blocks(page, "bash"), f"docs/getting-started.md lacks the README's command:\n{command}"
    quickstart = _blocks(readme[readme.index("## Quickstart"):], "python")[0]
    assert quickstart in _blocks(page, "python"), "docs/getting-started.md lacks the README's quickstart"


def test_readme_links_resolve_and_reach_every_page():
    text = README.read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = {t for t in targets if not re.match(r"^[a-z]+://", t)}
    for target in local:
        assert (ROOT / target).exists(), f"README links {target}, which does not exist"
    pages = re.findall(r":\s+(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    assert len(pages) > 10
    missing = []
    for page in pages:
        if page == "index.md" or (page.startswith("api/") and page != "api/normdecouple.md"):
            continue  # the site's home says what the README says; one link into the API reference is enough
        # A page that only includes a file of the repository (the benchmark results, the examples' README) is
        # reached through that file as well.
        included = re.fullmatch(r'--8<-- "([^"]+)"\s*', (ROOT / "docs" / page).read_text())
        if f"docs/{page}" not in local and not (included and included.group(1) in local):
            missing.append(page)
    assert not missing, f"the README's Documentation list misses these pages of the site: {missing}"
