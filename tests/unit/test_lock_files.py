"""The lock files are in step with pyproject.toml, and the image and CI install from them.

`requirements.lock` (runtime) and `requirements-test.lock` (runtime plus the
`test` extra) pin every package with `==` and the sha256 of its files;
`scripts/lock` regenerates them. These checks read files only (no network):
a dependency added to pyproject.toml, a range that no longer allows the pinned
version, or a dependency removed from pyproject.toml but still pinned as a
direct one, all fail here until the locks are regenerated.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
RUNTIME_LOCK = REPO / "requirements.lock"
TEST_LOCK = REPO / "requirements-test.lock"
PROJECT_VIA = "billing-jobs (pyproject.toml)"
CONSTRAINT_VIA = "-c requirements.lock"
SHA256 = re.compile(r"--hash=sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Pin:
    name: str  # canonical
    version: str
    hashes: frozenset[str]
    via: tuple[str, ...]


def parse_lock(path: Path) -> dict[str, Pin]:
    """The pins of a lock file written by `uv pip compile --generate-hashes`."""
    pins: dict[str, Pin] = {}
    text = path.read_text(encoding="utf-8")
    # One block per package: `name==version \` up to the next unindented line.
    for block in re.split(r"\n(?=\S)", text):
        first, *rest = block.splitlines()
        if first.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+) \\", first)
        assert match, f"{path.name}: not an exact pin: {first!r}"
        name = canonicalize_name(match[1])
        hashes = frozenset(h for line in rest for h in SHA256.findall(line))
        assert all(
            SHA256.fullmatch(line.strip().rstrip(" \\")) or line.strip().startswith("#") for line in rest
        ), f"{path.name}: unexpected line in the entry of {name}"
        via_lines = [line.strip().lstrip("#").strip() for line in rest if line.strip().startswith("#")]
        via = tuple(v.removeprefix("via").strip() for v in via_lines if v.removeprefix("via").strip())
        assert name not in pins, f"{path.name}: {name} pinned twice"
        pins[name] = Pin(name, match[2], hashes, via)
    return pins


def pyproject_requirements() -> tuple[list[Requirement], list[Requirement]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    runtime = [Requirement(r) for r in project["dependencies"]]
    test = [Requirement(r) for r in project["optional-dependencies"]["test"]]
    return runtime, test


def extra_requirements(requirement: Requirement) -> set[str]:
    """Names the extras of `requirement` add (from the installed package's metadata)."""
    names = set()
    for text in metadata.requires(requirement.name) or []:
        needed = Requirement(text)
        if needed.marker is not None and any(
            needed.marker.evaluate({"extra": extra}) for extra in requirement.extras
        ):
            names.add(canonicalize_name(needed.name))
    return names


@pytest.fixture(scope="module")
def runtime_pins() -> dict[str, Pin]:
    return parse_lock(RUNTIME_LOCK)


@pytest.fixture(scope="module")
def test_pins() -> dict[str, Pin]:
    return parse_lock(TEST_LOCK)


def _check_covers(pins: dict[str, Pin], requirements: list[Requirement], lock: str) -> None:
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} of pyproject.toml is missing from {lock}: run scripts/lock"
        pin = pins[name]
        assert requirement.specifier.contains(Version(pin.version), prereleases=True), (
            f"{lock} pins {name}=={pin.version}, which pyproject.toml's {requirement} "
            "does not allow: run scripts/lock"
        )
        assert PROJECT_VIA in pin.via, f"{lock}: {name} is not marked as a dependency of pyproject.toml"
        if requirement.extras:
            added = extra_requirements(requirement)
            assert added, f"{requirement}: the extra adds nothing"
            assert added <= set(pins), f"{lock} lacks {sorted(added - set(pins))} of {requirement}"


def _check_no_stale_direct_pins(pins: dict[str, Pin], requirements: list[Requirement], lock: str) -> None:
    direct = {canonicalize_name(r.name) for r in requirements}
    stale = sorted(name for name, pin in pins.items() if PROJECT_VIA in pin.via and name not in direct)
    assert not stale, f"{lock} pins {stale} as direct dependencies, pyproject.toml has none: run scripts/lock"


def _check_closed(pins: dict[str, Pin], lock: str) -> None:
    """Every pin is hashed and wanted: by pyproject.toml or by another pin of the same file."""
    for pin in pins.values():
        assert pin.hashes, f"{lock}: {pin.name} has no --hash"
        wanted_by = [v for v in pin.via if v not in (PROJECT_VIA, CONSTRAINT_VIA)]
        assert pin.via, f"{lock}: {pin.name} has no `# via`"
        assert {canonicalize_name(v) for v in wanted_by} <= set(pins), (
            f"{lock}: {pin.name} is wanted by {pin.via}, not all of them pinned here"
        )
        assert PROJECT_VIA in pin.via or wanted_by, f"{lock}: nothing needs {pin.name}"


def test_runtime_lock_pins_every_runtime_dependency(runtime_pins: dict[str, Pin]) -> None:
    runtime, _ = pyproject_requirements()
    _check_covers(runtime_pins, runtime, RUNTIME_LOCK.name)
    _check_no_stale_direct_pins(runtime_pins, runtime, RUNTIME_LOCK.name)
    _check_closed(runtime_pins, RUNTIME_LOCK.name)


def test_test_lock_pins_runtime_and_test_dependencies(test_pins: dict[str, Pin]) -> None:
    runtime, test = pyproject_requirements()
    _check_covers(test_pins, runtime + test, TEST_LOCK.name)
    _check_no_stale_direct_pins(test_pins, runtime + test, TEST_LOCK.name)
    _check_closed(test_pins, TEST_LOCK.name)


def test_tests_run_the_versions_production_installs(
    runtime_pins: dict[str, Pin], test_pins: dict[str, Pin]
) -> None:
    """Every runtime pin is in the test lock with the same version and the same files."""
    for name, pin in runtime_pins.items():
        assert name in test_pins, f"{name} is in {RUNTIME_LOCK.name} but not in {TEST_LOCK.name}"
        assert test_pins[name].version == pin.version, name
        assert test_pins[name].hashes == pin.hashes, name


def test_parse_lock_catches_a_lock_out_of_step(tmp_path: Path) -> None:
    """The checks above fail on a lock that lacks a dependency, or pins one pyproject.toml forbids."""
    pins = parse_lock(RUNTIME_LOCK)
    runtime, _ = pyproject_requirements()
    without_click = {name: pin for name, pin in pins.items() if name != "click"}
    with pytest.raises(AssertionError, match="click"):
        _check_covers(without_click, runtime, "lock")
    too_old = dict(pins, sqlalchemy=Pin("sqlalchemy", "1.4.54", pins["sqlalchemy"].hashes, (PROJECT_VIA,)))
    with pytest.raises(AssertionError, match="does not allow"):
        _check_covers(too_old, runtime, "lock")
    stale = dict(pins, requests=Pin("requests", "2.32.3", frozenset({"x"}), (PROJECT_VIA,)))
    with pytest.raises(AssertionError, match="requests"):
        _check_no_stale_direct_pins(stale, runtime, "lock")
    unpinned = tmp_path / "bad.lock"
    unpinned.write_text("click>=8.1 \\\n    --hash=sha256:" + "0" * 64 + "\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="not an exact pin"):
        parse_lock(unpinned)


def _install_commands(path: Path) -> list[str]:
    joined = path.read_text(encoding="utf-8").replace("\\\n", " ")
    lines = joined.splitlines()
    return [line for line in lines if "pip install" in line and not line.lstrip().startswith("#")]


def test_ci_installs_from_the_test_lock() -> None:
    commands = _install_commands(REPO / ".ci" / "run")
    assert len(commands) == 2, commands
    assert "--require-hashes" in commands[0]
    assert "-r requirements-test.lock" in commands[0]
    assert re.search(r"--no-deps -e \.$", commands[1].strip()), commands[1]


def test_image_installs_from_the_runtime_lock() -> None:
    (command,) = _install_commands(REPO / "Dockerfile")
    first, second = command.split("&&")[1:]
    assert "--require-hashes -r requirements.lock" in first
    assert re.search(r"--no-deps \.$", second.strip()), second
    assert "!requirements.lock" in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
