"""Every chapter executes from a wheel installed outside the repository.

What a reader in Colab or Binder gets: the package built as a wheel and installed (not
editable) with its ``book`` extra into a fresh virtual environment in a temporary folder, and
each chapter executed there by nbclient from a temporary working directory, with nothing of
the repository on ``sys.path``. The chapters must run without an error; their outputs are not
compared (strict nbval does that in the repository).

Dependencies are installed at the versions of ``requirements.lock`` (as constraints, without
the hashes) so they come from the same wheels the book was executed with: the CPU torch from
the wheel folder pip's configuration names (``/opt/wheels`` on CI), the rest from the package
index (pip's cache makes a second run fast). About 1-2 minutes of installing, then the chapters
in parallel (``MTLBOOK_WHEEL_JOBS``, default: the CPU count, at most 5).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.wheel

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "book").glob("*.ipynb"))


def _run(cmd, **kw):
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def _constraints(path: Path) -> Path:
    """requirements.lock's pins without hashes or options (pip refuses hashes in constraints)."""
    pins = re.findall(r"^([A-Za-z0-9._\[\]-]+==[^\s\\;]+)", (ROOT / "requirements.lock").read_text(), flags=re.M)
    pins = [re.sub(r"\[.*\]", "", p) for p in pins if not p.lower().startswith("mtlbook")]
    path.write_text("\n".join(pins) + "\n")
    return path


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP", "JUPYTER_PATH"}}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(ROOT)))
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def wheel_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("wheel")
    assert ROOT not in base.parents, "the test must run outside the repository"
    # 1. build the wheel from a copy of what it packages (the checkout stays free of build/ and egg-info)
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "mtlbook", src / "mtlbook", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = base / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
         env=_clean_env())
    (wheel,) = dist.glob("mtlbook-*.whl")
    # 2. a fresh environment with the wheel, its book extra and nbclient (the executor)
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], env=_clean_env())
    py = venv / "bin" / "python"
    env = _clean_env(PIP_DISABLE_PIP_VERSION_CHECK="1")
    _run([str(py), "-m", "pip", "install", "--quiet", "-c", str(_constraints(base / "constraints.txt")),
          f"mtlbook[book] @ {wheel.as_uri()}", "nbclient"], env=env, cwd=base)
    where = _run([str(py), "-c", "import mtlbook, mtlbook.tables as t; print(mtlbook.__file__); print(len(t.table_names()))"],
                 env=env, cwd=base).split()
    # 3. the chapters, copied into a temporary working directory
    run_dir = base / "run"
    run_dir.mkdir()
    copies = [shutil.copy(nb, run_dir / nb.name) for nb in CHAPTERS]
    jobs = int(os.environ.get("MTLBOOK_WHEEL_JOBS", min(5, os.cpu_count() or 1)))
    out = base / "results.json"
    env_run = _clean_env(MPLBACKEND="Agg", PYDEVD_DISABLE_FILE_VALIDATION="1")
    done = subprocess.run([str(py), str(ROOT / "scripts" / "execute_chapters.py"), "--jobs", str(jobs),
                           "--out", str(out), *map(str, copies)], capture_output=True, text=True, env=env_run, cwd=run_dir)
    if not out.exists():
        pytest.fail(f"execute_chapters.py wrote no results:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    results = {r["notebook"]: r for r in json.loads(out.read_text())}
    print(done.stdout)
    return {"venv": venv, "module": where[0], "tables": int(where[1]), "results": results}


def test_the_package_comes_from_the_wheel(wheel_run):
    """Not the checkout: the installed copy lives in the fresh environment, with its tables."""
    module = Path(wheel_run["module"])
    assert wheel_run["venv"] in module.parents and ROOT not in module.parents
    assert "site-packages" in module.parts
    assert wheel_run["tables"] >= 5, "the stored tables must ship as package data"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_executes_from_the_wheel(wheel_run, chapter):
    result = wheel_run["results"][chapter.name]
    assert result["ok"], f"{chapter.name} failed after {result['seconds']} s:\n{result['error']}"
