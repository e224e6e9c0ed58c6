"""datagen's pytest plugin (registered through the ``pytest11`` entry point).

Fixtures for any project that installs datagen:

``datagen_cassette``
    Records the test's LLM traffic to ``cassettes/<test name>.yaml`` beside the test file
    on the first run (or whenever ``DATAGEN_RECORD=1``) and replays it afterwards, with no
    server and no network. Requests match on method, path and body; credential headers and
    known secrets are scrubbed before anything is written.
``fake_llm``
    The in-process fake model behind ``provider: fake``, reset for each test: script its
    replies (``fake_llm.script(...)``) or give it a rule (``fake_llm.rule(fn)``), then
    inspect ``fake_llm.calls``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import datagen.testing.fake_model  # noqa: F401 - registers `provider: fake`


@pytest.fixture
def datagen_cassette(request: pytest.FixtureRequest) -> Iterator[Any]:
    from datagen.testing.cassettes import make_vcr, recording_requested

    directory = Path(str(request.node.fspath)).parent / "cassettes"
    name = f"{request.node.name}.yaml"
    record = recording_requested() or not (directory / name).exists()
    with make_vcr(directory, record=record).use_cassette(name) as cassette:
        yield cassette


@pytest.fixture
def fake_llm() -> Iterator[Any]:
    from datagen.testing.fake_model import fake_llm as shared

    shared.reset()
    yield shared
    shared.reset()
