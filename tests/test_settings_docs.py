"""docs/settings.md must list exactly the settings the code reads."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_settings_doc_is_current() -> None:
    spec = importlib.util.spec_from_file_location("gen_settings_docs", ROOT / "scripts" / "gen_settings_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert (ROOT / "docs" / "settings.md").read_text() == mod.render(), (
        "docs/settings.md is stale: run `python scripts/gen_settings_docs.py`")


def test_bad_settings_are_refused_with_a_clear_message() -> None:
    import pytest
    from pydantic import ValidationError

    from edge_agent.settings import AgentSettings
    from server.settings import ServerSettings

    with pytest.raises(ValidationError, match="model_kind"):
        ServerSettings(model_kind="transformer")
    with pytest.raises(ValidationError, match="input_shape"):
        ServerSettings(input_shape="1,x,28")
    with pytest.raises(ValidationError, match="shard_index"):
        AgentSettings(shard_index=3, num_shards=2)
    with pytest.raises(ValidationError, match="host:port"):
        AgentSettings(server="no-port")
    with pytest.raises(ValidationError, match="watch_dir"):
        AgentSettings(source="folder")
