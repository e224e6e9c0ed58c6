"""Helpers for testing pipelines offline: a fake OpenAI-compatible server on 127.0.0.1."""

from datagen.testing.fake_server import FakeOpenAIServer, FakeReply, completion_body, echo_draft

__all__ = ["FakeOpenAIServer", "FakeReply", "completion_body", "echo_draft"]
