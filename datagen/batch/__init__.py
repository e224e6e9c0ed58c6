"""Batch mode's provider side: the batch APIs (OpenAI Files + Batches and any compatible
base_url, Anthropic Message Batches), request files split at the providers' limits, the
durable ledger of every batch, file and request id, the flow that submits, polls and
collects, and the manifest's account of it.

- ``target``: which batch API serves a model (a clear error when none does), its limits
  and prices;
- ``requests``: a round's request files, streamed to disk;
- ``ledger``: the SQLite ledger, written before each provider call;
- ``api``, ``openai_api``, ``anthropic_api``, ``http``: the clients;
- ``flow``, ``collect``: submit, poll with backoff, collect, resume after a crash;
- ``summary``: per-batch counts, cost and the explanation in the manifest.

The rounds themselves (the engine run again over the pool, batch steps answered from
here or deferred into the next batch) are the batch executor's:
:mod:`datagen.executors.batch`.
"""
