"""The shape of the code: the flow's packages depend one way, settings and the contract on
nothing of the application (static import graph, no code run)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONSUMER = REPO / "consumer"


def _module_imports(path: Path) -> set[str]:
    """Modules imported at module level (not under TYPE_CHECKING, not inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for child in (
            ast.walk(node)
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            else ()
        ):
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.add(child.module)
    return found


def _package_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "consumer" or len(parts) < 2:
        return None
    return parts[1]


def package_graph() -> dict[str, set[str]]:
    """consumer's top-level packages/modules and which others each imports."""
    graph: dict[str, set[str]] = {}
    for path in CONSUMER.rglob("*.py"):
        relative = path.relative_to(REPO).with_suffix("")
        source = _package_of(".".join(relative.parts))
        if source is None:
            continue
        targets = {_package_of(m) for m in _module_imports(path)}
        graph.setdefault(source, set()).update(t for t in targets if t and t != source)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    visiting: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> list[str] | None:
        if node in visiting:
            return [*visiting[visiting.index(node) :], node]
        if node in done:
            return None
        visiting.append(node)
        for nxt in sorted(graph.get(node, ())):
            found = visit(nxt)
            if found:
                return found
        visiting.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        found = visit(start)
        if found:
            return found
    return None


def test_no_import_cycle_between_consumer_packages() -> None:
    assert _cycle(package_graph()) is None, " -> ".join(_cycle(package_graph()) or [])


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_settings_import_no_feature() -> None:
    """Not even inside a function: a section that needs a feature's constant gets it from
    the contract (`schemas/`) or owns it."""
    for path in (CONSUMER / "settings").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        features = {m for m in imported if _package_of(m) not in (None, "settings")}
        assert not features, (path.relative_to(REPO), features)


def test_the_contract_imports_nothing_of_the_application() -> None:
    for path in (REPO / "schemas").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not {m for m in imported if m.split(".")[0] == "consumer"}, path


def test_reading_settings_and_cli_help_load_no_framework_or_engine() -> None:
    probe = (
        "import sys\n"
        "sys.argv = ['opstream', '--help']\n"
        "import consumer.settings\n"
        "from consumer.cli.main import build_parser\n"
        "build_parser()\n"
        "heavy = {'faststream', 'opentelemetry', 'duckdb', 'pyarrow', 'llama_cpp', 'torch',"
        " 'uvicorn'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_header_names_and_the_signing_scheme_are_defined_only_in_the_contract() -> None:
    """No module outside schemas/ defines a contract header name or a signing scheme tag:
    the server, the client and the tests import them from schemas.headers/schemas.signing."""
    contract_literal = ("x-opstream-", "opstream-hmac-", "correlation_id", "reply_to")
    for path in [*CONSUMER.rglob("*.py"), *(REPO / "topics").rglob("*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(
                node.value, ast.Constant
            ):
                value = node.value.value
                text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
                assert not (isinstance(text, str) and text.startswith(contract_literal)), (
                    f"{path.relative_to(REPO)}:{node.lineno} restates the contract: {text!r}"
                )


def test_the_client_imports_only_the_contract_aiokafka_and_pydantic() -> None:
    """`opstream_client` installs and imports without the server: statically it imports
    nothing but itself, the contract, aiokafka, pydantic, the standard library and
    (optionally) the OpenTelemetry API; importing it loads no server module."""
    allowed = {"opstream_client", "schemas", "aiokafka", "pydantic", "opentelemetry"}
    for path in (REPO / "opstream_client").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        outside = {
            m
            for m in imported
            if m.split(".")[0] not in allowed and m.split(".")[0] not in sys.stdlib_module_names
        }
        assert not outside, (path, outside)
    probe = (
        "import sys\n"
        "import opstream_client\n"
        "heavy = {'consumer', 'topics', 'faststream', 'duckdb', 'pyarrow', 'llama_cpp', 'torch',"
        " 'exllamav2', 'uvicorn', 'confluent_kafka'}\n"
        "loaded = {m.split('.')[0] for m in sys.modules} & heavy\n"
        "loaded |= {m for m in sys.modules if m.startswith('opentelemetry.sdk')}\n"
        "print(sorted(loaded))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_engine_imports_run_one_way_backends_scheduler_interface() -> None:
    """The engine interface (base.py) imports no scheduler and no backend; the scheduler no
    backend: a backend imports the scheduler's plain data, never the other way round."""
    engine = CONSUMER / "engine"
    backends = ("consumer.engine.llamacpp", "consumer.engine.exllamav2")
    base = _module_imports(engine / "base.py")
    assert not {m for m in base if m.startswith(("consumer.engine.scheduler", *backends))}
    for path in (engine / "scheduler").rglob("*.py"):
        assert not {m for m in _module_imports(path) if m.startswith(backends)}, path
