"""Execute chapter notebooks with nbclient, several at a time, and report each one's result.

    python scripts/execute_chapters.py --jobs 4 --out results.json a.ipynb b.ipynb ...

Meant to run with the interpreter of the environment under test (the kernel is that
interpreter's ``python3``), from the folder the chapters should see as their working
directory. Each notebook is executed in place (its outputs are replaced); ``--out`` gets a JSON
list of ``{"notebook", "ok", "seconds", "error"}``. The exit status is 1 when a chapter failed.
Imports nothing from mtlbook: it only drives kernels.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def execute(path: str, timeout: int) -> dict:
    import nbformat
    from nbclient import NotebookClient

    started = time.perf_counter()
    nb = nbformat.read(path, as_version=4)
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=False,
                       resources={"metadata": {"path": str(Path(path).parent)}}).execute()
        error = None
    except Exception as exc:  # the cell's traceback is in the exception text
        # the cell's traceback without terminal colours
        error = re.sub(r"\x1b\[[0-9;]*m", "", f"{type(exc).__name__}: {exc}")[-4000:] or traceback.format_exc()[-4000:]
    nbformat.write(nb, path)
    return {"notebook": Path(path).name, "ok": error is None,
            "seconds": round(time.perf_counter() - started, 1), "error": error}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+")
    parser.add_argument("--jobs", type=int, default=2, help="notebooks executed at the same time (>= 1)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    # spawn, not fork: a forked worker inherits the parent's ZeroMQ and asyncio state, and a
    # kernel client in it can wait forever for a message that already arrived
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(execute, args.notebooks, [args.timeout] * len(args.notebooks)))
    args.out.write_text(json.dumps(results, indent=1))
    for r in results:
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['seconds']:7.1f} s  {r['notebook']}", flush=True)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
