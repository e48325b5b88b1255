"""The locks: requirements.lock (pip, sha256) and scripts/vendor/package-lock.json (npm, integrity).

Fast and offline: they read the committed files only. That the environment really is the
lock is checked by `scripts/lockcheck.py` (a step of `make test`); its comparison logic is
tested here on made-up freeze output.
"""

from __future__ import annotations

import importlib.util
import json
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
VENDOR = ROOT / "scripts" / "vendor"


def _load_lockcheck():
    spec = importlib.util.spec_from_file_location("lockcheck", ROOT / "scripts" / "lockcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lockcheck = _load_lockcheck()


@pytest.fixture(scope="module")
def locked() -> dict[str, tuple[str, list[str]]]:
    return lockcheck.parse_lock(LOCK.read_text())


def _direct_requirements() -> list[Requirement]:
    reqs = []
    for raw in (ROOT / "requirements.txt").read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            reqs.append(Requirement(line))
    return reqs


def test_every_lock_entry_is_an_exact_pin_with_a_sha256_hash():
    """Read the raw text independently of the parser: each requirement line is `name==version \\`
    followed by `--hash=sha256:<64 hex>` lines, and nothing else is a requirement."""
    lines = LOCK.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line and not line[0].isspace() and not line.startswith("#")]
    assert len(starts) > 50
    for n, i in enumerate(starts):
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==\S+ \\", lines[i]), lines[i]
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        hashes = [line for line in lines[i + 1:end] if "--hash=" in line]
        assert hashes, f"{lines[i]} has no hash"
        assert all(re.fullmatch(r"\s+--hash=sha256:[0-9a-f]{64}( \\)?", h) for h in hashes), hashes


def test_parser_reads_every_entry_with_its_hashes(locked):
    n_entries = sum(1 for line in LOCK.read_text().splitlines() if re.match(r"[A-Za-z0-9]", line))
    assert len(locked) == n_entries
    assert all(hashes for _, hashes in locked.values())
    assert sum(len(h) for _, h in locked.values()) == LOCK.read_text().count("--hash=sha256:")


def test_every_direct_dependency_is_locked_at_an_allowed_version(locked):
    reqs = _direct_requirements()
    names = {canonicalize_name(r.name) for r in reqs}
    assert {"torch", "numpy", "pandas", "jupyter-book", "pooch"} <= names
    for req in reqs:
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is in requirements.txt but not in requirements.lock"
        version = locked[name][0]
        assert req.specifier.contains(version, prereleases=True), f"lock has {req.name}=={version}, wanted {req}"


def test_every_direct_dependency_has_a_reason():
    for raw in (ROOT / "requirements.txt").read_text().splitlines():
        if raw.strip() and not raw.startswith("#"):
            assert " # " in raw and len(raw.split(" # ", 1)[1].strip()) > 10, f"no reason given: {raw!r}"


def test_package_ranges_hold_at_the_locked_versions(locked):
    """pyproject's compatible ranges (for installs into other environments) admit the lock."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(canonicalize_name(Requirement(d).name) == "pooch" for d in deps)
    for dep in map(Requirement, deps):
        version = locked[canonicalize_name(dep.name)][0]
        assert dep.specifier.contains(version, prereleases=True), f"lock has {dep.name}=={version}, pyproject wants {dep}"


def test_optional_dependency_ranges_hold_at_the_locked_versions(locked):
    """The extras (book, methods, cluster) admit the lock too; mtlbook[...] refers to itself."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"book", "methods", "cluster"} <= set(extras)
    for name, deps in extras.items():
        for dep in map(Requirement, deps):
            if canonicalize_name(dep.name) == "mtlbook":
                assert dep.extras <= set(extras), f"{name}: {dep} names an unknown extra"
                continue
            version = locked[canonicalize_name(dep.name)][0]
            assert dep.specifier.contains(version, prereleases=True), f"{name}: lock has {dep.name}=={version}, pyproject wants {dep}"


def test_torch_is_the_2_13_0_cpu_wheel_and_nothing_from_cuda(locked):
    version, hashes = locked["torch"]
    assert Version(version).public == "2.13.0"
    assert Version(version).local == "cpu"
    assert len(hashes) == 1  # the one local CPU wheel
    cuda = [n for n in locked if n.startswith("nvidia-") or n.startswith("triton")]
    assert cuda == []


def test_package_json_pins_the_vendored_versions_exactly():
    deps = json.loads((VENDOR / "package.json").read_text())["dependencies"]
    assert deps == {"@jupyter-widgets/html-manager": "1.0.15", "mathjax": "3.2.2", "requirejs": "2.3.8"}


def test_package_lock_has_an_integrity_hash_for_every_package():
    lock = json.loads((VENDOR / "package-lock.json").read_text())
    assert lock["lockfileVersion"] >= 2
    packages = {k: v for k, v in lock["packages"].items() if k}
    assert len(packages) >= 3
    for key, meta in packages.items():
        assert re.fullmatch(r"sha512-[A-Za-z0-9+/]{86}==", meta.get("integrity", "")), f"{key}: {meta.get('integrity')}"
    root_deps = lock["packages"][""]["dependencies"]
    assert root_deps == json.loads((VENDOR / "package.json").read_text())["dependencies"]
    for name, version in root_deps.items():
        assert packages[f"node_modules/{name}"]["version"] == version


# --- the comparison behind `make test`'s "installed packages = requirements.lock" step ---

FREEZE = """\
Jinja2==3.1.6
# Editable Git install with no remote (mtlbook==0.1.0)
-e /work/main
pip==23.2.1
torch==2.13.0+cpu
typing_extensions==4.16.0
"""


def test_compare_accepts_an_environment_equal_to_the_lock():
    locked = {"jinja2": "3.1.6", "torch": "2.13.0+cpu", "typing-extensions": "4.16.0"}
    assert lockcheck.compare(locked, lockcheck.parse_freeze(FREEZE)) == []


def test_compare_lists_missing_extra_and_changed_versions():
    locked = {"jinja2": "3.1.5", "torch": "2.13.0+cpu", "pooch": "1.9.0"}
    problems = lockcheck.compare(locked, lockcheck.parse_freeze(FREEZE))
    assert problems == [
        "version  jinja2: lock 3.1.5, installed 3.1.6",
        "missing  pooch==1.9.0 (in the lock, not installed)",
        "extra    typing-extensions==4.16.0 (installed, not in the lock)",
    ]


def test_compare_flags_a_direct_reference_that_is_not_a_pin():
    installed = lockcheck.parse_freeze("torch @ file:///tmp/torch.whl\n")
    problems = lockcheck.compare({"torch": "2.13.0+cpu"}, installed)
    assert len(problems) == 1 and problems[0].startswith("version  torch: lock 2.13.0+cpu, installed <not a pin")


def test_parse_lock_rejects_a_range():
    with pytest.raises(ValueError, match="line 2 is not an exact `name==version` pin"):
        lockcheck.parse_lock("# header\nnumpy>=2 \\\n    --hash=sha256:" + "0" * 64 + "\n")
