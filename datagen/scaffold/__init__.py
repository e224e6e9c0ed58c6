"""``datagen init NAME``: a pipeline folder that runs as created on the embedded model.

The template (``template/`` beside this file) is a small documents -> summaries pipeline
with a test that replays a cassette of real SmolLM2 output, so ``pytest`` passes in the
new folder with no server and no network.
"""

from __future__ import annotations

import shutil
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent / "template"


def create(target: Path) -> Path:
    """Copy the template to ``target`` (which must not exist); returns its path."""
    target = target.expanduser().resolve()
    if target.exists():
        raise FileExistsError(f"{target} already exists")
    shutil.copytree(TEMPLATE, target,
                    ignore=shutil.ignore_patterns("__pycache__", "output", ".datagen_chunks"))
    return target
