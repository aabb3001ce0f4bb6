"""The README's recipes, taken from README.md itself and run as a user would copy them.

Each block marked `<!-- readme-recipe: NAME -->` in the README runs against a broker of
this module's own, under the default topic names the README uses (`ops.requests.v1`,
`ops.replies.v1`), with signatures required and the real model: the kcat recipe (signing in
bash and openssl, a UUID correlation id) on Debian's kcat pointed at confluent-kafka's
librdkafka as the README says (on `tests/support/kcat_shim.py` where no kcat is installed),
the `opstream` command lines (requests, a batch, limits, usage), the admin API's curl lines,
the settings file, the Python client snippets and the Node.js (KafkaJS) example (skipped,
saying why, where node or npm's kafkajs is missing). The only edits a block gets are the
addresses and folders of this test's service: `broker:9092`, `localhost:8080` and
`/var/lib/opstream/usage` become its own.
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
ADMIN_KEY = "readme-admin-key"
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


def for_service(code: str, service: ConsumerProcess, bootstrap: str) -> str:
    """A block pointed at this test's service: its broker, HTTP port and usage folder."""
    usage = service.env["OPSTREAM_USAGE__DIRECTORY"]
    return (
        for_broker(code, bootstrap)
        .replace("localhost:8080", f"127.0.0.1:{service.port}")
        .replace("/var/lib/opstream/usage", usage)
    )


RECIPES = {
    "kcat",
    "kcat-librdkafka",
    "cli-request",
    "cli-extract",
    "python-extract",
    "cli-batch",
    "cli-limits",
    "cli-usage",
    "admin-api",
    "settings-toml",
    "python-request",
    "python-stream",
    "node",
    "java",
}


def test_every_recipe_the_tests_run_is_marked_in_the_readme() -> None:
    blocks = readme_blocks()
    assert RECIPES <= set(blocks), RECIPES - set(blocks)
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
            "quota": {"admin_key": ADMIN_KEY},
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


def _kcat_shim_on_path(bin_dir: Path) -> None:
    shim = bin_dir / "kcat"
    shim.write_text(
        f'#!/bin/sh\nexec {sys.executable} {REPO / "tests/support/kcat_shim.py"} "$@"\n'
    )
    shim.chmod(0o755)


def run_kcat_recipe(blocks: dict[str, str], bootstrap: str, tmp: Path) -> str:
    """The README's librdkafka set-up for Debian's kcat, then its kcat recipe, in one shell
    whose home is `tmp` (the set-up links a library under ~/.local)."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "HOME": str(tmp),
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
    }
    env.pop("LD_LIBRARY_PATH", None)
    if shutil.which("kcat") is None:
        _kcat_shim_on_path(bin_dir)
        setup = "echo 'no kcat installed: running the recipe on tests/support/kcat_shim.py'\n"
    else:
        setup = console_script(blocks["kcat-librdkafka"])
    script = tmp / "recipe.sh"
    script.write_text(setup + for_broker(console_script(blocks["kcat"]), bootstrap))
    # The reader never exits (like kcat -C): done once grep printed the reply.
    return _run_until(
        ["bash", "-e", str(script)],
        env=env,
        cwd=tmp,
        done=re.compile(r"correlation_id=\S+ .*\}\n"),
        timeout_s=90,
    )


def _reply_line(output: str) -> dict:
    for line in output.splitlines():
        if line.startswith("correlation_id="):
            return json.loads(line.split(" ", 1)[1])
    raise AssertionError(f"no reply printed:\n{output[-3000:]}")


def test_the_kcat_recipe_is_answered_ok_with_a_uuid_correlation_id(
    service: ConsumerProcess, own_broker: Broker, tmp_path: Path
) -> None:
    output = run_kcat_recipe(readme_blocks(), own_broker.bootstrap, tmp_path)
    if shutil.which("kcat") is not None:
        # The README's set-up put a current librdkafka under Debian's kcat.
        version = re.search(r"^librdkafka (\d+)\.(\d+)", output, re.M)
        assert version is not None, output[-3000:]
        assert (int(version[1]), int(version[2])) >= (2, 3), version[0]
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


def run_console_block(
    block: str, service: ConsumerProcess, bootstrap: str, tmp: Path, timeout_s: float = 240
) -> subprocess.CompletedProcess[str]:
    """A console block as one bash script (stop at the first failing command, `set -x` so
    each command is in the output), in a shell whose `opstream` is this checkout's."""
    script = tmp / "block.sh"
    script.write_text("set -ex\n" + for_service(console_script(block), service, bootstrap))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        # What an operator with signing on has configured: the tenants' keys, the admin key.
        "OPSTREAM_AUTH__KEYS": json.dumps(KEYS),
        "OPSTREAM_QUOTA__ADMIN_KEY": ADMIN_KEY,
        # What *From the command line* exported, in the shell the README's reader goes on in.
        "OPSTREAM_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
    }
    env.pop("OPSTREAM_USAGE__DIRECTORY", None)  # the usage block sets it itself
    return subprocess.run(
        ["bash", str(script)], env=env, cwd=tmp, capture_output=True, text=True, timeout=timeout_s
    )


def _json_documents(text: str) -> list[dict]:
    """The JSON objects printed one after another (pretty-printed or one per line)."""
    decoder, found, at = json.JSONDecoder(), [], 0
    while (start := text.find("{", at)) >= 0:
        try:
            value, at = decoder.raw_decode(text, start)
        except ValueError:
            at = start + 1
            continue
        found.append(value)
    return found


def test_the_cli_request_lines_each_print_an_ok_reply(
    service: ConsumerProcess, own_broker: Broker, tmp_path: Path
) -> None:
    done = run_console_block(
        readme_blocks()["cli-request"], service, own_broker.bootstrap, tmp_path
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    replies = [doc for doc in _json_documents(done.stdout) if "status" in doc]
    assert [reply["status"] for reply in replies] == ["ok"] * 4, done.stdout[-3000:]
    assert set(replies[2]["result"]) >= {"label"}
    assert replies[2]["result"]["label"] in ("positive", "negative")


def test_the_cli_batch_lines_write_one_result_per_request(
    service: ConsumerProcess, own_broker: Broker, tmp_path: Path
) -> None:
    done = run_console_block(readme_blocks()["cli-batch"], service, own_broker.bootstrap, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(result["line"] for result in results) == [1, 2]
    assert {result["status"] for result in results} == {"ok"}, results


def test_the_limits_and_admin_api_lines_run_and_agree(
    service: ConsumerProcess, own_broker: Broker, tmp_path: Path
) -> None:
    blocks = readme_blocks()
    done = run_console_block(blocks["cli-limits"], service, own_broker.bootstrap, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # After the block: summarize 5000 a day, the '*' override at 2,000,000 tokens, chat back
    # to the default. The admin API (read by the README's curl lines) agrees once applied.
    api = tmp_path / "api"
    api.mkdir()

    def summarize_limit() -> object:
        curl = run_console_block(blocks["admin-api"], service, own_broker.bootstrap, api)
        assert curl.returncode == 0, curl.stdout[-2000:] + curl.stderr[-2000:]
        first = _json_documents(curl.stdout)[0]
        rows = {row["operation"]: row for row in first["limits"] if row["tenant_id"] == "acme"}
        return rows.get("summarize", {}).get("daily_limit")

    assert wait_until_blocking(
        lambda: summarize_limit() == 5000, 30, interval_s=1.0, raise_on_timeout=False
    )


def test_the_usage_lines_report_the_requests_the_recipes_sent(
    service: ConsumerProcess, own_broker: Broker, tmp_path: Path
) -> None:
    # The CLI tests above sent requests as tenant `demo`; their usage rows flush within a second.
    def usage_csv() -> str:
        done = run_console_block(
            readme_blocks()["cli-usage"], service, own_broker.bootstrap, tmp_path
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    deadline = time.monotonic() + 30
    out = usage_csv()
    while "demo," not in out and time.monotonic() < deadline:
        time.sleep(1)
        out = usage_csv()
    row = next(line for line in out.splitlines() if line.startswith("demo,"))
    assert int(row.split(",")[1]) >= 1, out
    assert (tmp_path / "report.html").stat().st_size > 1000


def test_the_settings_file_loads_as_the_readme_says(tmp_path: Path) -> None:
    from consumer.settings import load_settings

    config = tmp_path / "opstream.toml"
    config.write_text(readme_blocks()["settings-toml"])
    settings = load_settings(config)
    assert settings.profile == "production"
    assert settings.kafka.bootstrap_servers == "kafka-1:9092,kafka-2:9092"
    assert settings.engine.backend == "exllamav2"
    assert str(settings.engine.exllamav2.model_dir).endswith("exl2-4.25bpw")
    assert settings.quota.default_daily_requests == 1000


def test_the_cli_extract_lines_answer_data_valid_against_the_schema(
    service: ConsumerProcess, own_broker: Broker, tmp_path: Path
) -> None:
    import jsonschema

    done = run_console_block(
        readme_blocks()["cli-extract"], service, own_broker.bootstrap, tmp_path
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reply = next(doc for doc in _json_documents(done.stdout) if "status" in doc)
    assert reply["status"] == "ok", reply
    schema = json.loads((tmp_path / "person.schema.json").read_text())
    jsonschema.validate(reply["result"]["data"], schema)


def test_the_python_extract_snippet_prints_two_schema_fields(
    service: ConsumerProcess, own_broker: Broker, tmp_path: Path
) -> None:
    out = run_python_block(readme_blocks()["python-extract"], own_broker.bootstrap, tmp_path)
    # `severity refund_requested` on ok: values only the schema allows.
    assert re.search(r"^(low|medium|high) (True|False)$", out.strip().splitlines()[-1]), out
