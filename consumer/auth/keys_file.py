"""The tenant keys file: reading it (JSON or TOML), appending a key, keeping it private."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from consumer.settings.auth import TENANT_KEYS, TenantKey, TenantKeys


def read_keys_file(path: Path) -> TenantKeys:
    """Parse a keys file: JSON when it ends in `.json`, TOML otherwise. Empty file: no keys."""
    raw = path.read_bytes()
    try:
        if path.suffix.lower() == ".json":
            data: Any = json.loads(raw) if raw.strip() else {}
        else:
            data = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        # Parser messages can quote the offending line, which may hold a secret.
        raise ValueError(f"keys file {path} is not valid {_format_name(path)}") from None
    try:
        return TENANT_KEYS.validate_python(data)
    except ValidationError as exc:
        raise ValueError(f"keys file {path}: {_describe(exc)}") from None


def append_key(path: Path, tenant_id: str, key: TenantKey) -> None:
    """Add `key` for `tenant_id` to a keys file, creating it readable by its owner only."""
    existing = read_keys_file(path) if path.exists() else {}
    for tenant, keys in existing.items():
        if any(k.key_id == key.key_id for k in keys):
            raise ValueError(f"key id {key.key_id!r} already exists (tenant {tenant!r})")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        existing.setdefault(tenant_id, []).append(key)
        document = {tenant: [_key_document(k) for k in keys] for tenant, keys in existing.items()}
        text = json.dumps(document, indent=2) + "\n"
        tmp = path.with_name(f".{path.name}.tmp")
        _write_private(tmp, text, append=False)
        os.replace(tmp, path)
        return
    # TOML: appending keeps the operator's comments and layout; an array of tables may
    # be continued anywhere in the file.
    lines = [
        "",
        f"[[{json.dumps(tenant_id)}]]",
        f"key_id = {json.dumps(key.key_id)}",
        f"secret = {json.dumps(key.secret.get_secret_value())}",
    ]
    if key.created_at is not None:
        lines.append(f"created_at = {key.created_at.isoformat()}")
    _write_private(path, "\n".join(lines) + "\n", append=True)


def is_private(path: Path) -> bool:
    """Whether only the owner may read or write the file (no group/other bits)."""
    return path.stat().st_mode & 0o077 == 0


def _write_private(path: Path, text: str, *, append: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _key_document(key: TenantKey) -> dict[str, str]:
    document = {"key_id": key.key_id, "secret": key.secret.get_secret_value()}
    if key.created_at is not None:
        document["created_at"] = key.created_at.isoformat()
    return document


def _format_name(path: Path) -> str:
    return "JSON" if path.suffix.lower() == ".json" else "TOML"


def _describe(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
        for err in exc.errors(include_input=False, include_url=False)
    )
