"""The dependency lock: what scripts/env.sh installs, complete, and what this suite runs with."""

import importlib.metadata as md
import re
from pathlib import Path

import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(name: str) -> dict[str, tuple[str, Requirement]]:
    """Lock file -> {canonical name: (pinned version, requirement)}, following `-r` includes."""
    pins = {}
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-r "):
            pins.update(read_lock(line[3:].strip()))
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{line}: a lock pins exact versions"
        pins[canonical(req.name)] = (spec.version, req)
    return pins


def applies(req: Requirement, extra: str = "") -> bool:
    return req.marker is None or req.marker.evaluate({**default_environment(), "extra": extra})


def test_env_sh_installs_exactly_the_lock():
    script = (ROOT / "scripts" / "env.sh").read_text()
    assert 'LOCK="requirements/lock.txt"' in script and 'LOCK="requirements/lock-test.txt"' in script
    assert re.search(r'pip install [^\n]*--no-deps -r "\$LOCK"', script), "the lock must be installed without resolving anything else"
    assert re.search(r"pip install [^\n]*--no-deps[^\n]* -e \.", script), "infd itself must not pull unlocked dependencies"
    assert "pip install --quiet --disable-pip-version-check torch" not in script, "torch comes from the lock, not the newest release"
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text() or "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_every_declared_dependency_is_pinned_within_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime, test = read_lock("lock.txt"), read_lock("lock-test.txt")
    for extra, declared, pins in (("", project["dependencies"], runtime), ("test", project["optional-dependencies"]["test"], test)):
        for text in declared:
            req = Requirement(text)
            if not applies(req, extra):
                continue
            name = canonical(req.name)
            assert name in pins, f"{req.name} is declared in pyproject.toml but not locked"
            assert req.specifier.contains(pins[name][0], prereleases=True), f"{req.name}=={pins[name][0]} is outside pyproject's {req.specifier}"


def test_this_environment_is_the_locked_set():
    """The suite runs with exactly the locked versions (what a fresh clone installs)."""
    pins = read_lock("lock-test.txt")
    wrong = []
    for _name, (version, req) in pins.items():
        if not applies(req):
            continue
        try:
            installed = md.version(req.name)
        except md.PackageNotFoundError:
            wrong.append(f"{req.name} missing")
            continue
        if installed != version:
            wrong.append(f"{req.name} {installed} (lock: {version})")
    advice = "run bash scripts/test.sh (it reinstalls from the lock) or scripts/lock.sh after a deliberate upgrade"
    assert not wrong, "installed packages differ from requirements/lock*.txt: " + ", ".join(wrong) + "; " + advice
