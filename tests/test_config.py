from __future__ import annotations

import pytest

from appliance.config import ConfigError, load_settings


def test_defaults_live_under_home(tmp_path):
    s = load_settings({"APPLIANCE_HOME": str(tmp_path)})
    assert s.api_port == 8000 and s.api_host == "127.0.0.1"
    assert s.broker_front == f"ipc://{tmp_path}/var/run/broker-front.ipc"
    assert s.uses_tiny_model and s.model_file == tmp_path / "var/data/models/appliance-tiny.gguf"
    assert s.model_name == "appliance-tiny"


def test_environment_beats_dotenv(tmp_path):
    (tmp_path / ".env").write_text("# comment\nAPI_PORT=9001\nexport QUEUE_MAX_SIZE='50'\nMODEL_PATH=/m/x.gguf\n")
    s = load_settings({"APPLIANCE_HOME": str(tmp_path), "API_PORT": "9002"})
    assert s.api_port == 9002 and s.queue_max_size == 50
    assert s.model_name == "x" and not s.uses_tiny_model


@pytest.mark.parametrize("key, value, expected", [
    ("API_PORT", "eighty", "API_PORT"),
    ("API_PORT", "70000", "API_PORT"),
    ("QUEUE_MAX_SIZE", "0", "QUEUE_MAX_SIZE"),
    ("LLAMA_SLOTS", "-1", "LLAMA_SLOTS"),
    ("JWT_ALGORITHM", "none", "JWT_ALGORITHM"),
    ("OPS_ENDPOINTS", "everyone", "OPS_ENDPOINTS"),
    ("ALLOW_INSECURE_DEV", "maybe", "ALLOW_INSECURE_DEV"),
])
def test_a_wrong_value_names_the_key(tmp_path, key, value, expected):
    with pytest.raises(ConfigError, match=expected):
        load_settings({"APPLIANCE_HOME": str(tmp_path), key: value})


def test_a_broken_dotenv_line_is_reported(tmp_path):
    (tmp_path / ".env").write_text("API_PORT 8000\n")
    with pytest.raises(ConfigError, match=r"\.env:1"):
        load_settings({"APPLIANCE_HOME": str(tmp_path)})


def test_overlong_ipc_path_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="RUN_DIR"):
        load_settings({"APPLIANCE_HOME": str(tmp_path), "RUN_DIR": "/tmp/" + "x" * 120})


def test_database_url_names_the_journal(tmp_path):
    s = load_settings({"APPLIANCE_HOME": str(tmp_path)})
    assert s.journal_path == str(tmp_path / "var/data/journal.sqlite3")
    s = load_settings({"APPLIANCE_HOME": str(tmp_path), "DATABASE_URL": "sqlite:////srv/journal.db"})
    assert s.journal_path == "/srv/journal.db"
    with pytest.raises(ConfigError, match="DATABASE_URL: scheme 'mysql' is not supported; use sqlite:///PATH or "
                                          "postgresql://") as refused:
        load_settings({"APPLIANCE_HOME": str(tmp_path), "DATABASE_URL": "mysql://u:secret@db/appliance"})
    assert "secret" not in str(refused.value)
    s = load_settings({"APPLIANCE_HOME": str(tmp_path), "DATABASE_URL": "postgresql://app:s3cret@db:5433/journal"})
    assert s.journal_path == "postgresql://app@db:5433/journal" and not s.journal_sqlite


def test_a_retired_key_is_named_not_silently_ignored(tmp_path, caplog):
    (tmp_path / ".env").write_text("API_THREADS=8\n")
    with caplog.at_level("WARNING", logger="appliance.config"):
        load_settings({"APPLIANCE_HOME": str(tmp_path)})
    assert "API_THREADS is no longer read" in caplog.text and "API_CONNECTIONS" in caplog.text
