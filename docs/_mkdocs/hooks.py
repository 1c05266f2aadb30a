"""mkdocs hooks: files of the repository that live outside ``docs/`` but belong on the site.

The reproduction's plots stay where ``examples/reproduce.py`` writes them (``examples/results/``); the site serves
them under ``assets/results/`` so that the pages can show and link them, and a missing plot fails the strict
build like a broken link. Tables are brought in with ``pymdownx.snippets`` instead (``--8<--`` lines).
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

# (directory of the repository, where the site serves its files, file pattern)
EXTERNAL_FILES = (("examples/results", "assets/results", "**/*.png"),)


def on_files(files: Files, *, config: MkDocsConfig) -> Files:
    root = Path(config.config_file_path).parent
    for source, target, pattern in EXTERNAL_FILES:
        for path in sorted((root / source).glob(pattern)):
            uri = f"{target}/{path.relative_to(root / source).as_posix()}"
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
