"""ops/systemd: the unit (read with configparser, as systemd reads it) and its example env file."""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from tests.unit.deployment.files import (
    GRACE_SETTING,
    HTTP_PORT,
    SYSTEMD_ENV,
    SYSTEMD_UNIT,
    env_file,
)

_SYSTEMD_SPAN = re.compile(r"(\d+(?:\.\d+)?)\s*(min|sec|ms|us|h|m|s)?")
_SYSTEMD_UNITS = {"h": 3600.0, "min": 60.0, "m": 60.0, "sec": 1.0, "s": 1.0, None: 1.0}
_SYSTEMD_UNITS |= {"ms": 1e-3, "us": 1e-6}


def _systemd_timespan_seconds(text: str) -> float:
    """systemd time spans: '90', '60s', '1min 30s'."""
    matches = list(_SYSTEMD_SPAN.finditer(text))
    if not matches or re.sub(r"\s+", "", "".join(m.group(0) for m in matches)) != re.sub(
        r"\s+", "", text
    ):
        raise ValueError(f"not a systemd time span: {text!r}")
    return sum(float(m.group(1)) * _SYSTEMD_UNITS[m.group(2)] for m in matches)


def _systemd_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "yes", "true", "on"}:
        return True
    if lowered in {"0", "no", "false", "off"}:
        return False
    raise ValueError(f"not a systemd boolean: {value!r}")


class _MultiValueDict(dict):
    """Lets configparser keep every value of a repeated key, as systemd does."""

    def __setitem__(self, key: str, value: Any) -> None:
        if isinstance(value, list) and isinstance(self.get(key), list):
            self[key].extend(value)
        else:
            super().__setitem__(key, value)


@pytest.fixture(scope="module")
def unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(
        dict_type=_MultiValueDict,
        strict=False,
        delimiters=("=",),
        comment_prefixes=("#", ";"),
        empty_lines_in_values=False,
        interpolation=None,
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(SYSTEMD_UNIT.read_text(encoding="utf-8"))
    return parser


def _values(unit: configparser.RawConfigParser, key: str) -> list[str]:
    raw = unit.get("Service", key, fallback=None)
    return [] if raw is None else raw.split("\n")


def test_systemd_unit_runs_the_consumer_as_a_dedicated_user(unit):
    service = unit["Service"]
    assert service["User"] not in {"", "root", "0"}
    assert shlex.split(service["ExecStart"])[-1:] == ["run"]
    assert Path(shlex.split(service["ExecStart"])[0]).name == "opstream"
    assert service["EnvironmentFile"] == "/etc/opstream/opstream.env"
    assert service["Restart"] == "on-failure"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_unit_is_sandboxed(unit):
    service = unit["Service"]
    for flag in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelModules"):
        assert _systemd_bool(service[flag]), flag
    assert service["ProtectSystem"] == "strict"
    assert service["CapabilityBoundingSet"] == ""
    assert "@system-service" in service["SystemCallFilter"].split()
    families = set(service["RestrictAddressFamilies"].split())
    assert "AF_INET" in families and families <= {"AF_UNIX", "AF_INET", "AF_INET6"}


def test_systemd_unit_can_write_only_the_usage_directory(unit):
    writable = [Path(p.lstrip("-")) for v in _values(unit, "ReadWritePaths") for p in v.split()]
    usage_dir = Path("/var/lib/opstream/usage")
    assert any(usage_dir.is_relative_to(p) for p in writable)
    assert all(p.is_relative_to("/var/lib/opstream") for p in writable)


def test_systemd_unit_allows_the_nvidia_devices_and_nothing_else(unit):
    service = unit["Service"]
    assert service["DevicePolicy"] == "closed"
    allowed = {v.split()[0] for v in _values(unit, "DeviceAllow")}
    assert {"/dev/nvidiactl", "/dev/nvidia0", "/dev/nvidia-uvm"} <= allowed
    assert all(device.startswith("/dev/nvidia") for device in allowed)
    # PrivateDevices would hide /dev/nvidia*; MemoryDenyWriteExecute breaks CUDA's JIT.
    assert not _systemd_bool(service.get("PrivateDevices", "no"))
    assert not _systemd_bool(service.get("MemoryDenyWriteExecute", "no"))


def test_systemd_stop_timeout_outlasts_the_shutdown_drain(unit):
    grace = float(env_file(SYSTEMD_ENV)[GRACE_SETTING])
    assert _systemd_timespan_seconds(unit["Service"]["TimeoutStopSec"]) > grace


def test_systemd_example_env_configures_the_gpu_engine_and_keys():
    env = env_file(SYSTEMD_ENV)
    assert all(k.startswith(("OPSTREAM_", "OTEL_")) for k in env)
    assert env["OPSTREAM_ENGINE__BACKEND"] == "exllamav2"
    assert Path(env["OPSTREAM_ENGINE__EXLLAMAV2__MODEL_DIR"]).is_absolute()
    assert Path(env["OPSTREAM_AUTH__KEYS_FILE"]).is_absolute()
    assert env["OPSTREAM_HTTP__HOST"] == "127.0.0.1"
    assert int(env["OPSTREAM_HTTP__PORT"]) == HTTP_PORT
