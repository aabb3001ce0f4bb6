"""`opstream keys new|list`: the key it prints is the key consumers accept."""

from __future__ import annotations

import argparse
import json
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from consumer.auth import AuthSettings, KeyRing
from consumer.cli.keys import register
from schemas.signing import sign


def run(argv: list[str], auth: AuthSettings | None = None) -> int:
    parser = argparse.ArgumentParser(prog="opstream")
    subparsers = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=None)
    register(subparsers, common)
    args = parser.parse_args(argv)
    settings = SimpleNamespace(profile="production", auth=auth or AuthSettings())
    code: int = args.func(args, settings)
    return code


@pytest.mark.parametrize("name", ["keys.toml", "keys.json"])
def test_new_key_is_written_private_and_verifies_what_the_producer_signs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    keys_file = tmp_path / "secrets" / name
    assert run(["keys", "new", "--tenant", "acme", "--keys-file", str(keys_file)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600

    body = b'{"tenant_id":"acme"}'
    headers = sign(body, "acme", printed["key_id"], printed["secret"], 1_000.0)
    keyring = KeyRing.from_settings(AuthSettings(keys_file=keys_file))
    assert (
        keyring.verify(headers, body, "acme", 1_000.0, record_timestamp_ms=1_000_000)
        == printed["key_id"]
    )


def test_second_key_for_a_tenant_is_appended_for_rotation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text("# operator comment survives\n")
    auth = AuthSettings(keys_file=keys_file)
    assert run(["keys", "new", "--tenant", "acme"], auth) == 0
    first = json.loads(capsys.readouterr().out)["key_id"]
    assert run(["keys", "new", "--tenant", "acme"], auth) == 0
    second = json.loads(capsys.readouterr().out)["key_id"]
    assert run(["keys", "new", "--tenant", "globex"], auth) == 0
    capsys.readouterr()

    keyring = KeyRing.from_settings(auth)
    assert keyring.key_ids("acme") == sorted([first, second])
    assert len(keyring.key_ids("globex")) == 1
    assert keys_file.read_text().startswith("# operator comment survives\n")


def test_list_shows_key_ids_but_never_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys_file = tmp_path / "keys.json"
    run(["keys", "new", "--tenant", "acme", "--keys-file", str(keys_file)])
    created = json.loads(capsys.readouterr().out)
    assert run(["keys", "list", "--keys-file", str(keys_file)]) == 0
    listed = capsys.readouterr().out
    header, _rule, row = listed.splitlines()
    assert header.split() == ["TENANT", "KEY", "ID", "CREATED"]
    assert row.split()[:2] == ["acme", created["key_id"]]
    assert created["secret"] not in listed


def test_new_without_a_keys_file_fails_with_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run(["keys", "new", "--tenant", "acme"]) == 2
    assert "--keys-file" in capsys.readouterr().err


def test_new_refuses_a_tenant_id_the_wire_contract_would_refuse(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.toml"
    assert run(["keys", "new", "--tenant", "acme corp", "--keys-file", str(keys_file)]) == 2
    assert not keys_file.exists()
