"""What can be checked of deploy/Dockerfile and .dockerignore without a Docker engine."""

from __future__ import annotations

import fnmatch
import re
from typing import Any

import pytest

from bridge.settings import load_settings
from tests.deploy.rendering import REPO, need

DOCKERFILE = REPO / "deploy" / "Dockerfile"
PINNED_PYTHON = re.compile(r"^python:3\.11\.\d+-slim(-[a-z]+)?(@sha256:[a-f0-9]{64})?$")
COMPILERS = ("gcc", "g++", "build-essential", "clang", "make", "cargo", "rustc")


def instructions() -> list[dict[str, Any]]:
    parser = need("dockerfile_parse").DockerfileParser(path=str(DOCKERFILE))
    structure: list[dict[str, Any]] = parser.structure
    return structure


def stages() -> list[list[dict[str, Any]]]:
    """Instructions grouped by build stage (global ARGs before the first FROM left out)."""
    grouped: list[list[dict[str, Any]]] = []
    for instruction in instructions():
        if instruction["instruction"] == "FROM":
            grouped.append([])
        if grouped:
            grouped[-1].append(instruction)
    return grouped


def global_args() -> dict[str, str]:
    args: dict[str, str] = {}
    for instruction in instructions():
        if instruction["instruction"] == "FROM":
            break
        if instruction["instruction"] == "ARG":
            name, _, default = instruction["value"].partition("=")
            args[name] = default
    return args


def base_image(stage: list[dict[str, Any]]) -> str:
    image = str(stage[0]["value"]).split()[0]
    for name, default in global_args().items():
        image = image.replace(f"${{{name}}}", default).replace(f"${name}", default)
    return image


def final_stage() -> list[dict[str, Any]]:
    return stages()[-1]


def values_of(stage: list[dict[str, Any]], instruction: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == instruction]


def test_is_multi_stage_on_a_pinned_slim_python() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2
    for stage in all_stages:
        image = base_image(stage)
        assert PINNED_PYTHON.match(image), f"{image} is not a pinned python slim image"
    # Same base in both stages: the virtualenv copied across needs the same interpreter path.
    assert len({base_image(stage) for stage in all_stages}) == 1


def test_builder_installs_the_project_and_final_copies_only_the_result() -> None:
    builder, final = stages()[0], final_stage()
    assert any(re.search(r"pip install\b.*\s\.(\s|$)", run) for run in values_of(builder, "RUN"))
    copies = values_of(final, "COPY")
    assert copies, "the final stage copies nothing from the builder"
    assert all(c.startswith("--from=builder ") for c in copies), copies


def test_no_compiler_in_the_final_stage() -> None:
    for run in values_of(final_stage(), "RUN"):
        words = set(re.split(r"[\s;&|]+", run))
        assert not words & set(COMPILERS), run


def test_runs_as_a_numeric_non_root_user() -> None:
    (user,) = values_of(final_stage(), "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), user
    assert int(uid) >= 10000, user
    assert gid.isdigit(), user
    assert int(gid) != 0, user


def final_env() -> dict[str, str]:
    parser = need("dockerfile_parse").DockerfileParser(path=str(DOCKERFILE))
    env: dict[str, str] = parser.envs
    return env


def test_env_and_ports_match_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {k: v for k, v in final_env().items() if k.startswith("LUMA_BRIDGE_")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    exposed = {int(p) for v in values_of(final_stage(), "EXPOSE") for p in v.split()}
    assert exposed == {settings.port, settings.admin_port}
    (volume,) = values_of(final_stage(), "VOLUME")
    assert str(settings.spool_dir) in volume


def test_healthcheck_asks_the_admin_port() -> None:
    (check,) = values_of(final_stage(), "HEALTHCHECK")
    assert "CMD" in check
    assert "/healthz" in check
    assert "LUMA_BRIDGE_ADMIN_PORT" in check
    assert "curl" not in check
    assert "wget" not in check


def test_entrypoint_is_the_console_script() -> None:
    (entrypoint,) = values_of(final_stage(), "ENTRYPOINT")
    assert entrypoint == '["luma-kafka-bridge"]'
    assert values_of(final_stage(), "CMD") == ['["serve"]']
    assert values_of(final_stage(), "STOPSIGNAL") == ["SIGTERM"]


def test_oci_labels() -> None:
    parser = need("dockerfile_parse").DockerfileParser(path=str(DOCKERFILE))
    labels: dict[str, str] = parser.labels
    for key in ("title", "description", "version", "revision", "created", "licenses", "source"):
        assert f"org.opencontainers.image.{key}" in labels


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves `path` out (last matching pattern wins, `!` re-includes)."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        bare = pattern.removeprefix("**/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(
            fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p.split("/")[-1], bare) for p in prefixes
        ):
            result = not negate
    return result


def test_dockerignore_keeps_what_the_build_copies_and_drops_the_rest() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in ("pyproject.toml", "README.md", "bridge/__init__.py", "bridge/settings.py"):
        assert not ignored(needed, patterns), needed
    for dropped in (
        ".git/HEAD",
        "tests/unit/test_x.py",
        "bridge/__pycache__/x.pyc",
        ".venv/bin/python",
    ):
        assert ignored(dropped, patterns), dropped
    # What the Dockerfile copies must exist.
    for copy in values_of(stages()[0], "COPY"):
        for source in copy.split()[:-1]:
            assert (REPO / source).exists(), source
