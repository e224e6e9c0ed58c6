from __future__ import annotations

from pathlib import Path

import pytest

from datagen.config import load_settings
from datagen.errors import ConfigError

BASE = """
model:
  provider: openai
  model: gpt-4o-mini
  temperature: 0.7
  max_tokens: 1024
  rate_limit: 10
prompts:
  system_prompt_path: prompts/system.txt
  user_prompt_path: prompts/user.txt
output_data:
  output_dir: output
  experiment_name: demo_test
  need_time_stamp: true
"""


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(BASE)
    return path


def test_file_values_are_loaded(cfg: Path) -> None:
    s = load_settings(cfg)
    assert s.model.model_string() == "openai/gpt-4o-mini"
    assert s.model.temperature == 0.7
    assert s.model.rate_limit == 10
    assert s.output_data.experiment_name == "demo_test"
    assert s.sampling_params() == {"temperature": 0.7, "max_tokens": 1024}


def test_flat_override_wins_over_the_file(cfg: Path) -> None:
    s = load_settings(cfg, {"temperature": 0.9, "max_tokens": 2048})
    assert s.model.temperature == 0.9
    assert s.model.max_tokens == 2048
    assert s.model.model == "gpt-4o-mini"  # untouched keys keep the file's values


def test_section_override_merges_over_the_files_section(cfg: Path) -> None:
    s = load_settings(cfg, {"output_data": {"output_dir": "elsewhere",
                                            "need_time_stamp": False}})
    assert s.output_data.output_dir == "elsewhere"
    assert s.output_data.need_time_stamp is False
    assert s.output_data.experiment_name == "demo_test"


def test_dotted_override(cfg: Path) -> None:
    s = load_settings(cfg, {"model.temperature": 0.2})
    assert s.model.temperature == 0.2


def test_model_keyword_as_string_sets_the_model_name(cfg: Path) -> None:
    s = load_settings(cfg, {"model": "gpt-4.1"})
    assert s.model.model_string() == "openai/gpt-4.1"


def test_model_string_keeps_an_existing_provider_prefix(cfg: Path) -> None:
    s = load_settings(cfg, {"model": "openai/gpt-4.1"})
    assert s.model.model_string() == "openai/gpt-4.1"


def test_unknown_keyword_names_it_and_suggests(cfg: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, {"temprature": 0.9})
    assert "temprature" in str(err.value)
    assert "Did you mean 'temperature'" in str(err.value)


def test_unknown_key_in_file_names_it_and_suggests(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(BASE.replace("max_tokens: 1024", "max_token: 1024"))
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert "model.max_token" in str(err.value)
    assert "model.max_tokens" in str(err.value)


def test_unknown_section_in_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(BASE + "output:\n  x: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'output'.*output_data"):
        load_settings(path)


def test_unknown_key_inside_a_section_override(cfg: Path) -> None:
    with pytest.raises(ConfigError, match=r"output_data\.outdir.*output_data\.output_dir"):
        load_settings(cfg, {"output_data": {"outdir": "x"}})


def test_all_unknown_keys_are_reported_at_once(cfg: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, {"temprature": 1, "max_tokns": 5})
    assert "temprature" in str(err.value) and "max_tokns" in str(err.value)


def test_missing_config_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found.*config=PATH"):
        load_settings(tmp_path / "nope.yaml")


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("model:\n  provider: openai\n  model: [unclosed\nprompts: {}\n")
    with pytest.raises(ConfigError, match=r"YAML syntax error at line \d+"):
        load_settings(path)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_settings(path)


def test_wrong_type_names_the_field_and_value(cfg: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.temperature.*'hot'"):
        load_settings(cfg, {"temperature": "hot"})


def test_placeholders_are_all_listed(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    # unquoted (a YAML tag to the parser) and quoted forms both count
    path.write_text(BASE.replace("gpt-4o-mini", "!!PLACEHOLDER!!")
                    + "params:\n  source_dir: '!!PLACEHOLDER!!'\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path, {"api_key": "!!PLACEHOLDER!!"})
    text = str(err.value)
    assert "model.model" in text and "model.api_key" in text and "params.source_dir" in text


def test_env_references_are_resolved(cfg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DG_TEST_KEY", "sk-from-env-123456")
    monkeypatch.setenv("DG_TEST_MODEL", "gpt-env")
    s = load_settings(cfg, {"api_key": "${DG_TEST_KEY}", "model": "${DG_TEST_MODEL}"})
    assert s.model.api_key is not None
    assert s.model.api_key.get_secret_value() == "sk-from-env-123456"
    assert s.model.model == "gpt-env"


def test_env_default_and_missing(cfg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DG_UNSET_VAR", raising=False)
    s = load_settings(cfg, {"base_url": "${DG_UNSET_VAR:-http://127.0.0.1:1/v1}"})
    assert s.model.base_url == "http://127.0.0.1:1/v1"
    with pytest.raises(ConfigError, match="model.api_key needs environment variable DG_UNSET_VAR"):
        load_settings(cfg, {"api_key": "${DG_UNSET_VAR}"})


def test_empty_api_key_means_unset(cfg: Path) -> None:
    assert load_settings(cfg, {"api_key": "${DG_UNSET_VAR:-}"}).model.api_key is None


def test_secret_is_not_in_public_dict(cfg: Path) -> None:
    s = load_settings(cfg, {"api_key": "sk-very-secret-value"})
    assert "sk-very-secret-value" not in str(s.public_dict())
    assert "sk-very-secret-value" not in repr(s)


def test_prompt_paths_in_file_resolve_against_its_folder(
    cfg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    s = load_settings(cfg)
    assert s.prompts.user_prompt_path == str((tmp_path / "prompts/user.txt").resolve())


def test_keyword_prompt_path_resolves_against_cwd(
    cfg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    (work / "p").mkdir(parents=True)
    (work / "p" / "u.txt").write_text("x")
    monkeypatch.chdir(work)
    s = load_settings(cfg, {"user_prompt_path": "p/u.txt"})
    assert s.prompts.user_prompt_path == str((work / "p/u.txt").resolve())


def test_config_none_uses_only_keywords() -> None:
    s = load_settings(None, {"model": "m", "provider": "anthropic"})
    assert s.model.model_string() == "anthropic/m"


def test_extra_params_are_passed_through(cfg: Path) -> None:
    s = load_settings(cfg, {"extra_params": {"custom_flag": True}, "top_p": 0.5})
    assert s.sampling_params()["custom_flag"] is True
    assert s.sampling_params()["top_p"] == 0.5


def test_section_given_as_non_dict(cfg: Path) -> None:
    with pytest.raises(ConfigError, match="'output_data' is a section"):
        load_settings(cfg, {"output_data": "x"})
