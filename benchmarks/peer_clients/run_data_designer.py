"""NVIDIA Data Designer: one prompt per item, keep the text. Runs in its own venv.

The JSONL pool is a seed dataset (``LocalFileSeedSource``, read in order); one
``LLMTextColumnConfig`` renders the same system and user prompts (Jinja2) and calls a
``ModelProvider`` of type openai at the fake server. Concurrency:
``max_parallel_requests`` of the model's inference parameters (its adaptive admission
controller may run below it, never above). It has no requests-per-second setting.
Telemetry off (NEMO_TELEMETRY_ENABLED=false, set by the harness), its metrics endpoint
off (``otel_metrics_port=None``), health check skipped; tiktoken reads the files litellm
ships (TIKTOKEN_CACHE_DIR, set by the harness), so nothing is downloaded.
"""

from __future__ import annotations

import argparse

from _measure import SYSTEM, USER, parse_args, report


def jinja(template: str) -> str:
    """``Write about {topic}`` -> ``Write about {{ topic }}``."""
    return template.replace("{", "{{ ").replace("}", " }}")


def run(args: argparse.Namespace) -> int:
    import data_designer.config as dd
    from data_designer.interface import DataDesigner

    provider = dd.ModelProvider(name="fake", endpoint=args.base, provider_type="openai",
                                api_key="sk-fake")
    params = dd.ChatCompletionInferenceParams(max_tokens=32,
                                              max_parallel_requests=args.concurrency)
    model = dd.ModelConfig(alias="bench", model="bench", provider="fake",
                           inference_parameters=params, skip_health_check=True)
    builder = dd.DataDesignerConfigBuilder(model_configs=[model])
    builder.with_seed_dataset(dd.LocalFileSeedSource(path=str(args.pool)))
    builder.add_column(dd.LLMTextColumnConfig(name="text", model_alias="bench",
                                              system_prompt=jinja(SYSTEM), prompt=jinja(USER)))
    designer = DataDesigner(artifact_path=args.workdir / "artifacts", model_providers=[provider])
    designer.set_run_config(dd.RunConfig(otel_metrics_port=None))
    result = designer.create(builder, num_records=args.items, dataset_name="bench")
    texts = result.load_dataset()["text"]
    return int(sum(1 for text in texts if isinstance(text, str) and text))


def main() -> None:
    args = parse_args()
    from importlib.metadata import version

    import data_designer.config  # imported before the clock starts
    import data_designer.interface  # noqa: F401

    report(lambda: run(args), args, version=f"data-designer {version('data-designer')}")


if __name__ == "__main__":
    main()
