"""The xDS token: where it comes from, how it is checked, and that config errors never show it."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.config import ConfigError, parse_config
from controlplane.xds.auth import TOKEN_FILE, TokenAuth, resolve_token

POOLS = "pools:\n  chat:\n    backends:\n      a: {url: 'http://127.0.0.1:9001'}\n"


def test_token_must_come_from_the_environment_and_is_never_echoed() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config("controlplane:\n  xds: {port: 18000, token: literal-token-0123456789}\n" + POOLS, env={})
    assert "must name an environment variable" in str(err.value)
    assert "literal-token-0123456789" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_config("controlplane:\n  xds: {token: '${T}'}\n" + POOLS, env={"T": "short!"})
    assert "token must be 16 to 512" in str(err.value) and "short!" not in str(err.value)
    config = parse_config("controlplane:\n  xds: {token: '${T}'}\n" + POOLS, env={"T": "a" * 32})
    assert config.controlplane.xds.token is not None and "a" * 32 not in repr(config)


def test_only_the_exact_bearer_token_is_allowed() -> None:
    auth = TokenAuth("right-token-0123456789")
    assert auth.allows((("authorization", "Bearer right-token-0123456789"),))
    assert auth.allows((("x-other", "1"), ("authorization", b"Bearer right-token-0123456789")))
    for metadata in (None, (), (("authorization", "Bearer wrong-token-0123456789"),),
                     (("authorization", "right-token-0123456789"),), (("x-token", "Bearer right-token-0123456789"),)):
        assert not auth.allows(metadata), metadata
    with pytest.raises(ValueError):
        TokenAuth("")


def test_managed_runs_get_a_fresh_token_external_envoys_keep_theirs(tmp_path: Path) -> None:
    first = resolve_token(None, tmp_path, fresh=True)
    path = tmp_path / TOKEN_FILE
    assert path.read_text().strip() == first and path.stat().st_mode & 0o077 == 0
    second = resolve_token(None, tmp_path, fresh=True)
    assert second != first
    assert resolve_token(None, tmp_path, fresh=False) == second, "a restart must not lock out running Envoys"
    assert resolve_token("configured-token-0123456789", tmp_path, fresh=True) == "configured-token-0123456789"
    assert path.read_text().strip() == second
