"""The Dockerfile installs nothing that pyproject.toml does not declare, with consistent pins, and never
replaces the NGC image's own torch / Transformer Engine / apex / flash-attn builds (no container can be
built here: this reads the Dockerfile)."""

from __future__ import annotations

import re
import shlex

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import ROOT

IMAGE_PROVIDED = {"torch", "numpy", "transformer-engine", "flash-attn", "apex"}  # never pip-installed here
NO_DEPS_REQUIRED = {"megatron-core"}  # declares torch: a resolver could pull a PyPI wheel over the image's


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def pyproject_deps() -> dict[str, Requirement]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = [Requirement(r) for r in data["project"]["dependencies"]]
    return {canonicalize_name(r.name): r for r in reqs}


def pip_installs(text: str) -> list[tuple[list[str], list[str]]]:
    """(options, packages) of every ``pip install`` in a RUN instruction."""
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        if not line.startswith("RUN "):
            continue
        lexer = shlex.shlex(line[4:], posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        commands: list[list[str]] = [[]]
        for token in lexer:
            if token in ("&&", "||", ";", "|", "(", ")"):
                commands.append([])
            else:
                commands[-1].append(token)
        for words in commands:
            if "pip" not in words[:3] or "install" not in words:
                continue
            args = words[words.index("install") + 1:]
            opts, pkgs, skip = [], [], False
            for a in args:
                if skip:
                    opts[-1] += f" {a}"
                    skip = False
                elif a.startswith("-"):
                    opts.append(a)
                    skip = a in ("-c", "-r", "--constraint", "--requirement", "-e")
                else:
                    pkgs.append(a)
            out.append((opts, pkgs))
    return out


def test_base_image_is_a_pinned_ngc_pytorch_tag():
    m = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile(), re.MULTILINE)
    assert m and re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", m.group(1)), m
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", dockerfile(), re.MULTILINE)


def test_every_installed_package_is_declared_with_a_consistent_pin():
    deps = pyproject_deps()
    installs = pip_installs(dockerfile())
    assert installs, "no pip install found"
    installed = set()
    for opts, pkgs in installs:
        editable = [o for o in opts if o.startswith("-e ")]
        if editable or pkgs == ["."]:
            assert editable in ([], ["-e ."]) and "--no-deps" in opts, (opts, pkgs)  # the project itself
            continue
        for spec in pkgs:
            req = Requirement(spec)
            name = canonicalize_name(req.name)
            assert name in deps, f"Dockerfile installs {name}, which pyproject.toml does not declare"
            assert name not in IMAGE_PROVIDED, f"{name} comes with the NGC image; installing it would replace it"
            if name in NO_DEPS_REQUIRED:
                assert "--no-deps" in opts, f"{name} must be installed with --no-deps"
            else:
                assert any(o.startswith("-c ") for o in opts), f"{name}: install under the image's constraints"
            for pinned in (s.version for s in req.specifier if s.operator == "=="):
                assert deps[name].specifier.contains(pinned, prereleases=True), (
                    f"{name}=={pinned} in the Dockerfile is outside pyproject's {deps[name].specifier}")
            installed.add(name)
    missing = set(deps) - installed - IMAGE_PROVIDED
    assert not missing, f"pyproject.toml dependencies the Dockerfile does not install: {sorted(missing)}"
    assert any("--no-deps" in opts for opts, pkgs in installs if pkgs == [] or pkgs == ["."]), "project install"


def test_the_image_torch_satisfies_pyproject():
    m = re.search(r"^ARG IMAGE_TORCH_VERSION=(\S+)$", dockerfile(), re.MULTILINE)
    assert m, "Dockerfile: ARG IMAGE_TORCH_VERSION (the base image's torch) is missing"
    version = Version(m.group(1))
    assert version.is_prerelease  # NVIDIA's builds are pre-releases: the reason for --no-deps
    assert pyproject_deps()["torch"].specifier.contains(version, prereleases=True)


def test_dockerignore_keeps_data_and_venv_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "out", "logs"):
        assert entry in ignored
    for copied in re.findall(r"^COPY (.+) \S+$", dockerfile(), re.MULTILINE):
        for src in copied.split():
            assert (ROOT / src).exists(), f"COPY {src}: no such path"
            assert src not in ignored
