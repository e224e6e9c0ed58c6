"""Testing kit for pipelines: fake OpenAI-compatible, Anthropic and batch API servers on
127.0.0.1, an in-process fake model (``provider: fake``), and cassette record/replay (see
``cassettes``).

The pytest plugin (``datagen.testing.plugin``, registered as a pytest11 entry point) adds
the ``datagen_cassette`` and ``fake_llm`` fixtures to any project that installs datagen.
"""

from datagen.testing.fake_anthropic import FakeAnthropicServer
from datagen.testing.fake_model import FakeLLM, fake_llm
from datagen.testing.fake_server import (
    FakeOpenAIServer,
    FakeReply,
    FaultPlan,
    completion_body,
    echo_draft,
)  # fmt: skip

__all__ = ["FakeAnthropicServer", "FakeBatchServer", "FakeLLM", "FakeOpenAIServer",
           "FakeReply", "FaultPlan", "completion_body", "echo_draft", "fake_llm"]


def __getattr__(name: str) -> object:
    # lazy, so that ``python -m datagen.testing.fake_batch_server`` runs it only once
    if name == "FakeBatchServer":
        from datagen.testing.fake_batch_server import FakeBatchServer

        return FakeBatchServer
    raise AttributeError(f"module 'datagen.testing' has no attribute {name!r}")
