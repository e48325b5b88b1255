"""Compare what is installed in a virtual environment with ``requirements.lock``.

``python scripts/lockcheck.py`` runs ``pip freeze --all --exclude-editable`` with the
interpreter named by ``--python`` (default: ``.venv/bin/python``), compares it with the
lock, prints every difference and exits 1 when there is one (0 when the environment is
exactly the lock). ``--extras`` instead prints, one a line, the installed packages that the
lock does not list (``scripts/setup.sh`` uninstalls them, as ``pip-sync`` would).

Standard library only, so it runs before anything is installed. pip itself and the package
``mtlbook`` (installed editable, not from the lock) are not compared.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

#: packages never compared: pip is the installer itself; mtlbook is this repository.
IGNORED = frozenset({"pip", "mtlbook"})

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")
_HASH = re.compile(r"--hash=(sha256):([0-9a-f]{64})\b")


def canonical_name(name: str) -> str:
    """PEP 503 normalised project name: lower case, runs of ``-_.`` become one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(text: str) -> dict[str, tuple[str, list[str]]]:
    """Parse a pip-compile ``--generate-hashes`` lock.

    Returns ``{canonical name: (version, [sha256 hex, ...])}``. Continuation lines
    (``\\`` at the end) belong to the requirement above them; comments are skipped.
    Raises ValueError on a requirement line that is not an exact ``name==version`` pin.
    """
    entries: dict[str, tuple[str, list[str]]] = {}
    current: str | None = None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            if not raw.startswith(" "):
                current = None
            continue
        if raw[0].isspace() and current is not None:
            entries[current][1].extend(h for _, h in _HASH.findall(line))
            continue
        if line.startswith("-"):  # an option line such as --extra-index-url
            current = None
            continue
        m = _PIN.match(line)
        if m is None:
            raise ValueError(f"requirements.lock line {lineno} is not an exact `name==version` pin: {line!r}")
        current = canonical_name(m.group(1))
        if current in entries:
            raise ValueError(f"requirements.lock line {lineno}: {m.group(1)} is pinned twice")
        entries[current] = (m.group(2), [h for _, h in _HASH.findall(line)])
    return entries


def parse_freeze(text: str) -> dict[str, str]:
    """Parse ``pip freeze`` output into ``{canonical name: version}``.

    Editable installs (``-e ...``), comments and direct references (``name @ url``) other
    than exact pins are reported under their name with the version ``"<not a pin: ...>"``
    so that they show up as differences.
    """
    installed: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line.startswith("-e "):
            continue
        m = _PIN.match(line)
        if m:
            installed[canonical_name(m.group(1))] = m.group(2)
        else:
            name = re.split(r"[\s@=<>!~;]", line, maxsplit=1)[0]
            installed[canonical_name(name)] = f"<not a pin: {line}>"
    return installed


def compare(locked: dict[str, str], installed: dict[str, str], ignore: frozenset[str] = IGNORED) -> list[str]:
    """Every difference between the lock (``{name: version}``) and what is installed.

    One line per package, sorted by name: ``missing``, ``extra`` or ``version``.
    """
    problems = []
    for name in sorted(set(locked) | set(installed)):
        if name in ignore:
            continue
        want, have = locked.get(name), installed.get(name)
        if have is None:
            problems.append(f"missing  {name}=={want} (in the lock, not installed)")
        elif want is None:
            problems.append(f"extra    {name}=={have} (installed, not in the lock)")
        elif want.lower() != have.lower():
            problems.append(f"version  {name}: lock {want}, installed {have}")
    return problems


def pip_freeze(python: str) -> str:
    """``pip freeze --all --exclude-editable`` of the interpreter ``python``."""
    out = subprocess.run(
        [python, "-m", "pip", "freeze", "--all", "--exclude-editable", "--disable-pip-version-check"],
        check=True, capture_output=True, text=True,
    )
    return out.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lock", default="requirements.lock", help="the lock file (default: %(default)s)")
    parser.add_argument("--python", default=".venv/bin/python", help="interpreter of the venv (default: %(default)s)")
    parser.add_argument("--extras", action="store_true", help="only print installed packages missing from the lock")
    args = parser.parse_args(argv)

    locked = {name: version for name, (version, _) in parse_lock(Path(args.lock).read_text()).items()}
    installed = parse_freeze(pip_freeze(args.python))
    if args.extras:
        for name in sorted(set(installed) - set(locked) - IGNORED):
            print(name)
        return 0
    problems = compare(locked, installed)
    if problems:
        print(f"error: the packages installed in {args.python}'s environment differ from {args.lock} "
              f"({len(problems)} difference(s)):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        print("  fix: `bash scripts/setup.sh` installs exactly the lock (or remove .venv and run it again)",
              file=sys.stderr)
        return 1
    print(f"installed packages match {args.lock} ({len(locked)} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
