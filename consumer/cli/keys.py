"""`opstream keys …`: create tenant signing keys and list which ones exist."""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from datetime import UTC, datetime
from pathlib import Path

from pydantic import SecretStr, ValidationError

from consumer.auth.keys import SettingsWithAuth
from consumer.auth.keys_file import append_key, is_private, read_keys_file
from consumer.cli.table import print_table
from consumer.settings.auth import TenantKey
from schemas.headers import SIGNATURE_HEADERS
from schemas.signing import ID_PATTERN, SCHEME


def register(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """Add `keys new` and `keys list` to the `opstream` command line."""
    keys = subparsers.add_parser("keys", help="tenant signing keys (request authentication)")
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    new = actions.add_parser(
        "new",
        parents=[common],
        help="generate a key for a tenant, append it to the keys file, print it once",
    )
    new.add_argument("--tenant", required=True, help="tenant id the key signs for")
    new.add_argument(
        "--keys-file", type=Path, default=None, help="keys file (default: auth.keys_file)"
    )
    new.set_defaults(func=keys_new)

    listing = actions.add_parser(
        "list", parents=[common], help="list tenants and key ids in the keys file (no secrets)"
    )
    listing.add_argument(
        "--keys-file", type=Path, default=None, help="keys file (default: auth.keys_file)"
    )
    listing.set_defaults(func=keys_list)


def new_key_id() -> str:
    """A fresh, unguessable-enough key id; ids are public, secrets are not."""
    return f"key_{secrets.token_hex(8)}"


def keys_new(args: argparse.Namespace, settings: SettingsWithAuth) -> int:
    """Create a key; print tenant id, key id and secret as JSON on stdout for the producer."""
    path = _keys_file(args, settings)
    if path is None:
        return 2
    tenant_id: str = args.tenant
    if not ID_PATTERN.fullmatch(tenant_id):
        print("opstream keys new: --tenant must match [A-Za-z0-9._:-]{1,128}", file=sys.stderr)
        return 2
    try:
        key = TenantKey(
            key_id=new_key_id(),
            secret=SecretStr(secrets.token_urlsafe(32)),
            created_at=datetime.now(UTC).replace(microsecond=0),
        )
        append_key(path, tenant_id, key)
    except (ValueError, ValidationError, OSError) as exc:
        print(f"opstream keys new: {exc}", file=sys.stderr)
        return 1
    if not is_private(path):
        print(
            f"opstream keys new: warning: {path} is readable by others; run chmod 600 {path}",
            file=sys.stderr,
        )
    print(
        json.dumps(
            {
                "tenant_id": tenant_id,
                "key_id": key.key_id,
                "secret": key.secret.get_secret_value(),
                "scheme": SCHEME.decode(),
                "headers": list(SIGNATURE_HEADERS),
            },
            indent=2,
        )
    )
    print(
        f"Added {key.key_id} for tenant {tenant_id} to {path}. Hand the secret to the producer "
        "over a secure channel; it is not shown again. Consumers read keys when they start.",
        file=sys.stderr,
    )
    return 0


def keys_list(args: argparse.Namespace, settings: SettingsWithAuth) -> int:
    """Print a table of tenant, key id and creation time from the keys file (no secrets)."""
    path = _keys_file(args, settings)
    if path is None:
        return 2
    try:
        tenants = read_keys_file(path)
    except (ValueError, OSError) as exc:
        print(f"opstream keys list: {exc}", file=sys.stderr)
        return 1
    print_table(
        ["TENANT", "KEY ID", "CREATED"],
        [
            [tenant_id, key.key_id, key.created_at.isoformat() if key.created_at else "-"]
            for tenant_id in sorted(tenants)
            for key in tenants[tenant_id]
        ],
    )
    return 0


def _keys_file(args: argparse.Namespace, settings: SettingsWithAuth) -> Path | None:
    path: Path | None = args.keys_file or settings.auth.keys_file
    if path is None:
        print(
            "opstream keys: no keys file; pass --keys-file or set OPSTREAM_AUTH__KEYS_FILE",
            file=sys.stderr,
        )
    return path


def tenant_keys(settings: SettingsWithAuth) -> dict[str, tuple[str, str]]:
    """Each tenant's first signing key (key id, secret): settings, then the keys file."""
    keys = {tenant: list(found) for tenant, found in settings.auth.keys.items()}
    if settings.auth.keys_file is not None and settings.auth.keys_file.is_file():
        for tenant, found in read_keys_file(settings.auth.keys_file).items():
            keys.setdefault(tenant, []).extend(found)
    return {
        tenant: (found[0].key_id, found[0].secret.get_secret_value())
        for tenant, found in keys.items()
        if found
    }


def signing_key(args: argparse.Namespace, settings: SettingsWithAuth) -> tuple[str, str] | None:
    """`--key-id`/`--secret` when given (both or neither), else the tenant's first key."""
    if args.key_id and args.secret:
        return args.key_id, args.secret
    if args.key_id or args.secret:
        raise ValueError("give both --key-id and --secret")
    return tenant_keys(settings).get(args.tenant)
