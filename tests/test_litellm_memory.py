"""Issue 16.2: the litellm path queues no logging job per call (its memory stays flat).

Unpatched, litellm 1.106.2 queues one success-logging job per call on a global queue that
falls behind when the event loop is busy: ~0.2 jobs per call were left behind at 128 in
flight, each pinning its call's objects (909 MB at 200,000 calls). The benchmark
(benchmarks/throughput.py --scenario memory) measures the RSS; this checks the mechanism.
"""

from __future__ import annotations

import asyncio
import gc

from datagen.llm.litellm_transport import LiteLLMTransport, import_litellm
from datagen.llm.types import ChatRequest
from datagen.testing import FakeOpenAIServer


def live(type_name: str) -> int:
    return sum(1 for o in gc.get_objects() if type(o).__name__ == type_name)


async def test_a_thousand_calls_leave_no_logging_work_behind() -> None:
    litellm = import_litellm()
    from litellm.litellm_core_utils import logging_worker

    with FakeOpenAIServer(responder=lambda body: "hi", keep_bodies=False) as server:
        transport = LiteLLMTransport()
        request = ChatRequest(model="openai/m", messages=[{"role": "user", "content": "x"}],
                              provider="openai", base_url=server.base_url, api_key="k",
                              params={"max_tokens": 8})
        await asyncio.gather(*(transport.complete(request) for _ in range(50)))  # warm up
        gc.collect()
        before = live("Logging")

        async def calls(n: int) -> None:
            for _ in range(n):
                await transport.complete(request)

        await asyncio.gather(*(calls(8) for _ in range(128)))  # 1,024 calls, 128 at once
        gc.collect()
        queue = logging_worker.GLOBAL_LOGGING_WORKER._queue
        assert queue is None or queue.qsize() == 0
        assert live("Logging") - before < 20  # not one per call kept alive
        assert not litellm.success_callback  # nothing was listening: the patch applied
