"""ops/Dockerfile (read by BuildKit's own parser, the `dockerfile` package) and .dockerignore."""

from __future__ import annotations

import re
import shlex

import dockerfile
import pytest

from tests.unit.deployment.files import DOCKERIGNORE, HTTP_PORT, final_stage_entrypoint


def _arg_defaults(commands: tuple[dockerfile.Command, ...]) -> dict[str, str]:
    defaults: dict[str, str] = {}
    for command in commands:
        if command.cmd == "ARG":
            for item in command.value:
                name, _, default = item.partition("=")
                defaults.setdefault(name, default.strip('"'))
    return defaults


def _expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: variables[m.group(1)], text)


def _stage_base_images(dockerfile_commands, dockerfile_stages) -> list[str]:
    global_args = _arg_defaults(
        tuple(c for c in dockerfile_commands[: dockerfile_commands.index(dockerfile_stages[0][0])])
    )
    return [_expand(stage[0].value[0], global_args) for stage in dockerfile_stages]


def test_dockerfile_builds_on_cuda_devel_and_runs_on_cuda_runtime(
    dockerfile_commands, dockerfile_stages
):
    images = _stage_base_images(dockerfile_commands, dockerfile_stages)
    assert len(images) >= 2, "expected a multi-stage build"
    assert images[0] == "nvidia/cuda:12.4.1-devel-ubuntu22.04"
    assert re.fullmatch(r"nvidia/cuda:12\.4\.1-(base|runtime)-ubuntu22\.04", images[-1])
    build_name = dockerfile_stages[0][0].value[-1]
    copies_from_build = [
        c for c in dockerfile_stages[-1] if c.cmd == "COPY" and f"--from={build_name}" in c.flags
    ]
    assert copies_from_build, "runtime stage copies nothing from the build stage"


def test_dockerfile_compiles_exllamav2_for_the_t4_by_default(dockerfile_stages):
    build = dockerfile_stages[0]
    assert _arg_defaults(tuple(build))["TORCH_CUDA_ARCH_LIST"] == "7.5"
    env_set = [
        i for i, c in enumerate(build) if c.cmd == "ENV" and "TORCH_CUDA_ARCH_LIST" in c.value
    ]
    installs = [
        i
        for i, c in enumerate(build)
        if c.cmd == "RUN" and ".[gpu]" in shlex.split(c.value[0].replace("&&", " "))
    ]
    builds = [
        i
        for i, c in enumerate(build)
        if c.cmd == "RUN" and re.search(r"python -c .import exllamav2\b", c.value[0])
    ]
    assert installs and env_set and builds
    assert installs[0] < builds[0] and env_set[0] < builds[0]


def test_dockerfile_runtime_stage_runs_as_a_non_root_user(dockerfile_stages):
    users = [c.value[0] for c in dockerfile_stages[-1] if c.cmd == "USER"]
    assert users, "final stage never switches away from root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert user.isdigit() and int(user) >= 1000, "use a numeric uid so runAsNonRoot can check it"


def test_dockerfile_healthcheck_probes_the_health_endpoint(dockerfile_stages):
    (healthcheck,) = [c for c in dockerfile_stages[-1] if c.cmd == "HEALTHCHECK"]
    assert healthcheck.value[0] == "CMD"
    urls = re.findall(r"https?://[^'\"\s]+", " ".join(healthcheck.value[1:]))
    assert [re.sub(r"//(localhost|127\.0\.0\.1):", "//host:", u) for u in urls] == [
        f"http://host:{HTTP_PORT}/health"
    ]


def test_dockerfile_entrypoint_is_the_opstream_cli(dockerfile_stages):
    assert final_stage_entrypoint(dockerfile_stages) == ["opstream"]


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    patterns: list[tuple[bool, re.Pattern[str]]] = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        glob = line.lstrip("!").strip("/")
        regex = ""
        for token in re.split(r"(\*\*/|\*\*|\*|\?)", glob):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                token, re.escape(token)
            )
        # A pattern that matches a directory excludes everything below it too.
        patterns.append((negated, re.compile(f"{regex}(?:/.*)?")))
    return patterns


def _dockerignored(path: str) -> bool:
    excluded = False
    for negated, pattern in _dockerignore_patterns():
        if pattern.fullmatch(path):
            excluded = not negated
    return excluded


def test_dockerignore_keeps_what_the_dockerfile_copies(dockerfile_stages):
    sources = [
        source
        for command in dockerfile_stages[0]
        if command.cmd == "COPY" and not any(f.startswith("--from") for f in command.flags)
        for source in command.value[:-1]
    ]
    assert {"pyproject.toml", "consumer"} <= set(sources)
    for source in sources:
        assert not _dockerignored(source), f".dockerignore drops {source}, which COPY needs"
    assert not _dockerignored("consumer/engine/base.py")


@pytest.mark.parametrize(
    "path",
    [".git/HEAD", ".venv/bin/python", "models/qwen/model.safetensors", "x/smol.gguf", "usage"],
)
def test_dockerignore_keeps_weights_data_and_environments_out_of_the_context(path):
    assert _dockerignored(path)
