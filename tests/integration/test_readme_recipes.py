"""The README's recipes, taken from README.md itself and run as a user would copy them.

Each block marked `<!-- readme-recipe: NAME -->` in the README runs against a broker of
this module's own, under the default topic names the README uses (`ops.requests.v1`,
`ops.replies.v1`), with signatures required and the real model: the kcat recipe (signing in
bash and openssl, a UUID correlation id; `kcat` is `tests/support/kcat_shim.py` over
confluent-kafka, because Debian's kcat cannot talk to Tansu), the Python client snippets and
the Node.js (KafkaJS) example (skipped, saying why, where node or npm's kafkajs is missing).
The only edit a block gets is the broker address: `broker:9092` becomes this broker's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.support.harness import (
    REPO,
    Broker,
    ConsumerProcess,
    TopicSet,
    base_settings,
    ensure_test_topics,
    merge,
    start_consumer,
)
from tests.support.waiting import wait_until_blocking

pytestmark = pytest.mark.integration

# A mutated copy may stand in for it (to show a broken recipe fails: README_UNDER_TEST=FILE).
README = Path(os.environ.get("README_UNDER_TEST", REPO / "README.md"))
# The tenants, key ids and secrets the README's recipes sign with.
KEYS = {
    "demo": [{"key_id": "demo-1", "secret": "demo-secret-from-keys-new"}],
    "acme": [{"key_id": "acme-1", "secret": "acme-secret-from-keys-new"}],
}
_BLOCK = re.compile(r"<!-- readme-recipe: ([\w-]+) -->\n```(\w+)\n(.*?)\n```", re.DOTALL)


def readme_blocks(text: str | None = None) -> dict[str, str]:
    """The marked code blocks of the README: name -> code."""
    found = _BLOCK.findall(text if text is not None else README.read_text(encoding="utf-8"))
    return {name: code for name, _lang, code in found}


def console_script(block: str) -> str:
    """A console block as a bash script: `$ ` starts a command, `\\` continues it."""
    lines: list[str] = []
    continuing = False
    for line in block.splitlines():
        if line.startswith("$ "):
            lines.append(line[2:])
        elif continuing:
            lines.append(line)
        else:
            continue  # output shown in the README, not a command
        continuing = line.rstrip().endswith("\\")
    return "\n".join(lines) + "\n"


def for_broker(code: str, bootstrap: str) -> str:
    return code.replace("broker:9092", bootstrap)


def test_every_recipe_the_tests_run_is_marked_in_the_readme() -> None:
    blocks = readme_blocks()
    assert {"kcat", "python-request", "python-stream", "node"} <= set(blocks)
    assert "$ " in blocks["kcat"] and "kcat -C -u" in blocks["kcat"]


def test_console_script_joins_continued_lines() -> None:
    script = console_script("$ a \\\n    b\nprinted output\n$ c")
    assert script == "a \\\n    b\nc\n"


@pytest.fixture(scope="module")
def own_broker() -> Iterator[Broker]:
    """A broker of this module's own: the README's default topic names are free on it."""
    with Broker.start() as started:
        yield started


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def service(
    own_broker: Broker, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ConsumerProcess]:
    topics = TopicSet(
        requests="ops.requests.v1",
        replies="ops.replies.v1",
        dlq="ops.requests.dlq.v1",
        state="ops.quota.state.v1",
        control="ops.control.v1",
        group="opstream",
    )
    await ensure_test_topics(own_broker, topics)
    tmp = tmp_path_factory.mktemp("readme")
    settings = merge(
        base_settings(own_broker, topics, tmp, auth=True),
        {
            "auth": {"required": True, "keys": KEYS},
            "engine": {"backend": "llamacpp", "llamacpp": {"n_ctx": 1024}},
        },
    )
    consumer = ConsumerProcess(settings, fake_engine=False, log_path=tmp / "consumer.log")
    await start_consumer(consumer, timeout_s=120.0)
    yield consumer
    consumer.stop()


def _run_until(
    args: list[str], *, env: dict[str, str], cwd: Path, done: re.Pattern[str], timeout_s: float
) -> str:
    """Run `args` in its own process group until its stdout matches `done` (or it exits, or
    time runs out); then end the group. Returns stdout (and stderr, after a marker)."""
    out_path = cwd / f"out-{time.monotonic_ns()}.txt"
    err_path = out_path.with_suffix(".err")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        process = subprocess.Popen(
            args, env=env, cwd=cwd, stdout=out, stderr=err, start_new_session=True
        )
        try:
            wait_until_blocking(
                lambda: (
                    process.poll() is not None
                    or bool(done.search(out_path.read_text(errors="replace")))
                ),
                timeout_s,
                interval_s=0.1,
                raise_on_timeout=False,
            )
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(10)
    return (
        out_path.read_text(errors="replace")
        + "\n--- stderr ---\n"
        + err_path.read_text(errors="replace")
    )


def _kcat_on_path(bin_dir: Path) -> None:
    shim = bin_dir / "kcat"
    shim.write_text(
        f'#!/bin/sh\nexec {sys.executable} {REPO / "tests/support/kcat_shim.py"} "$@"\n'
    )
    shim.chmod(0o755)


def run_kcat_recipe(block: str, bootstrap: str, tmp: Path) -> str:
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    _kcat_on_path(bin_dir)
    script = tmp / "recipe.sh"
    script.write_text(for_broker(console_script(block), bootstrap))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    # The reader never exits (like kcat -C): done once grep printed the reply.
    return _run_until(
        ["bash", "-e", str(script)],
        env=env,
        cwd=tmp,
        done=re.compile(r"correlation_id=\S+ .*\}\n"),
        timeout_s=60,
    )


def _reply_line(output: str) -> dict:
    for line in output.splitlines():
        if line.startswith("correlation_id="):
            return json.loads(line.split(" ", 1)[1])
    raise AssertionError(f"no reply printed:\n{output[-3000:]}")


def test_the_kcat_recipe_is_answered_ok_with_a_uuid_correlation_id(
    service: ConsumerProcess, own_broker: Broker, tmp_path: Path
) -> None:
    output = run_kcat_recipe(readme_blocks()["kcat"], own_broker.bootstrap, tmp_path)
    correlation = re.search(r"correlation_id=([0-9a-f-]{36})", output)
    assert correlation is not None, output[-3000:]  # a UUID, longer than xxd -p's 30 bytes
    reply = _reply_line(output)
    assert reply["status"] == "ok", reply
    assert reply["result"]["label"] in ("positive", "negative")


def run_python_block(code: str, bootstrap: str, tmp: Path, timeout_s: float = 180) -> str:
    script = tmp / "snippet.py"
    script.write_text(for_broker(code, bootstrap))
    done = subprocess.run(
        [sys.executable, str(script)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_the_python_request_snippet_prints_a_summary(
    service: ConsumerProcess, own_broker: Broker, tmp_path: Path
) -> None:
    out = run_python_block(readme_blocks()["python-request"], own_broker.bootstrap, tmp_path)
    last = out.strip().splitlines()[-1]
    # `summary output_tokens` on ok; `code message` on an error reply.
    assert re.search(r" \d+$", last), out


def test_the_python_stream_snippet_streams_then_cancels(
    service: ConsumerProcess, own_broker: Broker, tmp_path: Path
) -> None:
    out = run_python_block(readme_blocks()["python-stream"], own_broker.bootstrap, tmp_path)
    assert "cancel: ok True" in out, out
    assert out.strip().endswith("final: error cancelled"), out


@pytest.fixture(scope="module")
def kafkajs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with npm's kafkajs installed (skips, saying why, when that cannot be had)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node or npm is not installed: the Node.js (KafkaJS) example is not run")
    folder = tmp_path_factory.mktemp("node")
    try:
        installed = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--silent", "kafkajs@2"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=180,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("npm install kafkajs timed out (no registry reachable?)")
    if installed.returncode != 0:
        pytest.skip(f"npm install kafkajs failed (offline?): {installed.stderr[-500:]}")
    return folder


def run_node_block(code: str, bootstrap: str, folder: Path, timeout_s: float = 180) -> str:
    script = folder / "example.js"
    script.write_text(for_broker(code, bootstrap))
    done = subprocess.run(
        ["node", str(script)], cwd=folder, capture_output=True, text=True, timeout=timeout_s
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_the_node_kafkajs_example_signs_streams_and_cancels(
    service: ConsumerProcess, own_broker: Broker, kafkajs_dir: Path
) -> None:
    out = run_node_block(readme_blocks()["node"], own_broker.bootstrap, kafkajs_dir)
    assert re.search(r"^classify ok (positive|negative)$", out, re.M), out
    assert re.search(r"^chat ok assistant (stop|length)$", out, re.M), out
    assert re.search(r"^cancel ok true$", out, re.M), out
    assert re.search(r"^story error cancelled$", out, re.M), out


def test_kafkajs_default_partitioner_places_tenants_as_java_does(kafkajs_dir: Path) -> None:
    """The README's partitioner table: KafkaJS 2's default matches murmur2, its legacy one not."""
    from aiokafka.partitioner import murmur2

    script = kafkajs_dir / "partitions.js"
    script.write_text(
        'const { Partitioners } = require("kafkajs");\n'
        "const partitionMetadata = [...Array(12).keys()].map((i) => ({ partitionId: i }));\n"
        "const place = (p, key) => p({ topic: 't', partitionMetadata, message: { key } });\n"
        "const d = Partitioners.DefaultPartitioner(), l = Partitioners.LegacyPartitioner();\n"
        "const keys = [...Array(100).keys()].map((i) => `tenant-${i}`);\n"
        "console.log(JSON.stringify(keys.map((k) => [k, place(d, k), place(l, k)])));\n"
    )
    done = subprocess.run(["node", str(script)], cwd=kafkajs_dir, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    java = {key: (murmur2(key.encode()) & 0x7FFFFFFF) % 12 for key, _, _ in rows}
    assert all(default == java[key] for key, default, _ in rows)
    assert sum(legacy == java[key] for key, _, legacy in rows) < len(rows) // 2
