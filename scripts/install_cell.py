"""Give every chapter notebook a first code cell that installs the package where it is missing.

    python scripts/install_cell.py                 # every book/*.ipynb
    python scripts/install_cell.py book/01_toy_simulator.ipynb
    python scripts/install_cell.py --check         # exit 1 naming notebooks without the current cell

The cell installs ``mtlbook[book]`` from the repository set once in ``_config.yml``
(``repository.url`` and ``repository.branch``) when ``import mtlbook`` would fail (Colab,
Binder, a fresh kernel) and does nothing otherwise (the book's own build, nbval, a local venv).
It is inserted before the first code cell (the title stays on top), tagged ``hide-input`` so
the book shows it collapsed, and found again by its id: running the script twice changes
nothing, and after a change of URL it rewrites the cell in place.

Re-execute a notebook after adding the cell (its stored outputs stay valid: the cell prints
nothing where mtlbook is installed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
CELL_ID = "mtlbook-install"
TAGS = ["hide-input"]


def repository(config_path: Path = ROOT / "_config.yml") -> tuple[str, str]:
    """``(url, branch)`` of the repository, from ``_config.yml``."""
    config = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
    repo = config.get("repository") or {}
    url = str(repo.get("url") or "").rstrip("/")
    if not url.startswith("https://"):
        raise ValueError(f"{config_path}: repository.url must be an https URL, got {url!r}")
    return url, str(repo.get("branch") or "main")


def cell_source(url: str, branch: str) -> str:
    requirement = f"mtlbook[book] @ git+{url}@{branch}"
    return (
        "# Installs the book's package where it is missing (Colab, Binder, a fresh kernel);\n"
        "# does nothing where mtlbook is already importable.\n"
        "import importlib.util\n"
        "import subprocess\n"
        "import sys\n"
        "\n"
        'if importlib.util.find_spec("mtlbook") is None:\n'
        f'    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "{requirement}"])'
    )


def _is_install_cell(cell) -> bool:
    return cell.get("id") == CELL_ID or cell.get("metadata", {}).get("mtlbook", {}).get("install_cell") is True


def add_install_cell(nb, url: str, branch: str) -> bool:
    """Insert or update the install cell of notebook ``nb`` in place; True when it changed."""
    source = cell_source(url, branch)
    existing = [k for k, c in enumerate(nb.cells) if _is_install_cell(c)]
    if existing:
        cell = nb.cells[existing[0]]
        changed = cell.source != source or cell.metadata.get("tags") != TAGS or len(existing) > 1
        cell.source = source
        cell.metadata["tags"] = list(TAGS)
        for k in reversed(existing[1:]):
            del nb.cells[k]
        return changed
    cell = nbformat.v4.new_code_cell(source=source, metadata={"tags": list(TAGS), "mtlbook": {"install_cell": True}})
    cell["id"] = CELL_ID
    first_code = next((k for k, c in enumerate(nb.cells) if c.cell_type == "code"), len(nb.cells))
    nb.cells.insert(first_code, cell)
    if nb.nbformat == 4 and nb.nbformat_minor < 5:  # cell ids need nbformat 4.5
        nb.nbformat_minor = 5
    return True


def process(path: Path, url: str, branch: str, write: bool = True) -> bool:
    nb = nbformat.read(path, as_version=4)
    changed = add_install_cell(nb, url, branch)
    if changed and write:
        nbformat.validate(nb)
        nbformat.write(nb, path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: book/*.ipynb")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook needs the cell")
    parser.add_argument("--config", type=Path, default=ROOT / "_config.yml")
    args = parser.parse_args(argv)
    url, branch = repository(args.config)
    notebooks = args.notebooks or sorted((ROOT / "book").glob("*.ipynb"))
    stale = [p for p in notebooks if process(p, url, branch, write=not args.check)]
    for path in stale:
        print(f"{'needs the install cell' if args.check else 'updated'}: {path}")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
