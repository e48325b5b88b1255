"""Checkpoint files: atomic writes, safe loads, RNG snapshots and run fingerprints.

**Atomic write.** :func:`atomic_save` serialises into a temporary file in the *same*
folder, flushes and ``fsync``\\ s it, then renames it over the target with
:func:`os.replace` (atomic on POSIX and Windows within one file system) and finally syncs
the folder entry. A crash at any point leaves either the old complete file or the new
complete file at ``path``, never a torn one; the temporary file is removed on failure.

**Safe load.** :func:`load_file` uses ``torch.load(weights_only=True)``, which unpickles
only tensors and primitive containers. Everything the trainer stores is therefore plain:
state dicts, numbers, strings, lists, dicts, and RNG states converted to tensors
(:func:`capture_rng_state`).

**Fingerprint.** :func:`model_fingerprint` lists every parameter and buffer name with its
shape; :func:`check_fingerprint` compares a stored fingerprint with the current one and
raises ``ValueError`` saying what differs, so a checkpoint of another model or another
configuration is refused instead of half-loaded.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

import numpy as np
import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "atomic_save",
    "atomic_write_bytes",
    "capture_rng_state",
    "check_fingerprint",
    "load_file",
    "model_fingerprint",
    "restore_rng_state",
]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: damaged, truncated, not a checkpoint, or
    missing an entry. The message names the file and what is wrong."""


#: Temporary files older than this are stale whatever their name says (seconds).
STALE_TMP_AGE_S = 3600.0


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}."


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but is not ours (or we cannot tell): leave its file alone
    return True


def clean_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Remove temporary files left by killed writes of ``path``; returns what was removed.

    A temporary file is named ``.<name>.<pid>.<random>.tmp``; it is stale when the process
    ``pid`` no longer exists, or (any name) when it is older than :data:`STALE_TMP_AGE_S`.
    Files of a live writer are left alone.
    """
    target = Path(path)
    removed: list[Path] = []
    if not target.parent.is_dir():
        return removed
    prefix = _tmp_prefix(target)
    now = time.time()
    for candidate in target.parent.iterdir():
        name = candidate.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        pid_text = name[len(prefix) :].split(".", 1)[0]
        pid = int(pid_text) if pid_text.isdigit() else None
        try:
            stale = (pid is not None and not _pid_alive(pid)) or (now - candidate.stat().st_mtime) > STALE_TMP_AGE_S
            if stale and pid != os.getpid():
                candidate.unlink()
                removed.append(candidate)
        except OSError:
            continue  # vanished meanwhile
    return removed


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj)`` to ``path`` so that ``path`` is never left half-written.

    Returns the final path. The parent folder is created if needed. Temporary files that
    killed writes of the same ``path`` left behind are removed first
    (:func:`clean_stale_temporaries`).
    """
    return _atomic_write(path, lambda handle: torch.save(obj, handle), usual_mode=False)


def atomic_write_bytes(data: bytes, path: str | os.PathLike[str]) -> Path:
    """Write ``data`` to ``path`` the way :func:`atomic_save` writes a checkpoint (temp file,
    fsync, :func:`os.replace`), with the mode a plain ``open`` would give (``0o666 & ~umask``).
    Returns the final path."""
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    return _atomic_write(path, lambda handle: handle.write(data), usual_mode=True)


def _atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], Any], usual_mode: bool) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(target)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f"{_tmp_prefix(target)}{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if usual_mode:  # mkstemp creates 0600
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_name, 0o666 & ~umask)
        os.replace(tmp_name, target)
    except BaseException:
        # Whatever went wrong (including KeyboardInterrupt), the old file is untouched.
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(target.parent)
    return target


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (POSIX); silently skipped where folders cannot be opened."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def load_file(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`atomic_save` with ``weights_only=True``.

    Raises ``FileNotFoundError`` when there is no file and :class:`CheckpointError` (a
    ``ValueError``) naming the file when it cannot be read as a checkpoint: truncated,
    damaged, empty, holding objects other than tensors and plain containers (a pickle
    payload is refused, never run), or not a dict.
    """
    target = Path(path)
    if target.exists() and not target.is_file():
        raise CheckpointError(f"checkpoint {str(target)!r} is not a regular file (a folder?)")
    if not target.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(target)!r}")
    try:
        with warnings.catch_warnings():
            # a foreign pickle protocol is refused below anyway; torch's advice is noise here
            warnings.simplefilter("ignore", UserWarning)
            data = torch.load(target, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"checkpoint {str(target)!r} holds objects other than tensors and plain containers, or is damaged "
            f"({first_line}); it is not loaded (only weights_only files written by mtlbook are accepted)"
        ) from None
    except (EOFError, OSError, RuntimeError, ValueError, KeyError, IndexError, TypeError, AttributeError) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else "the file ends early"
        raise CheckpointError(
            f"checkpoint {str(target)!r} is damaged or truncated ({type(error).__name__}: {detail}); "
            "resume from an earlier checkpoint or start afresh"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {str(target)!r} does not hold a checkpoint dict (got {type(data).__name__})")
    return data


# ---------------------------------------------------------------------- RNG states
def capture_rng_state(loader_generator: torch.Generator | None = None) -> dict[str, Any]:
    """The state of every RNG a training run draws from, as tensors and numbers.

    Covers torch (CPU and every CUDA device), numpy's global RNG, Python's ``random`` and,
    when given, the data loader's own ``torch.Generator`` (which decides the shuffling).
    """
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader": loader_generator.get_state() if loader_generator is not None else None,
    }
    return state


def restore_rng_state(state: Mapping[str, Any], loader_generator: torch.Generator | None = None) -> None:
    """Inverse of :func:`capture_rng_state` (the loader state only when a generator is given)."""
    torch.set_rng_state(state["torch"].cpu())
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].cpu().numpy().astype(np.uint32),
            int(np_state["pos"]),
            int(np_state["has_gauss"]),
            float(np_state["cached_gaussian"]),
        )
    )
    py_state = state["python"]
    random.setstate((int(py_state["version"]), tuple(int(v) for v in py_state["internal"].cpu().tolist()), py_state["gauss_next"]))
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
    if loader_generator is not None and state.get("loader") is not None:
        loader_generator.set_state(state["loader"].cpu())


# ---------------------------------------------------------------------- fingerprints
def model_fingerprint(*modules: tuple[str, nn.Module | None]) -> list[list[Any]]:
    """``[[qualified name, [shape...]], ...]`` of every parameter and buffer of the modules.

    Args:
        modules: ``(prefix, module)`` pairs, e.g. ``("model", model)``; ``None`` modules are
            skipped (recorded as absent by their prefix alone).
    """
    entries: list[list[Any]] = []
    for prefix, module in modules:
        if module is None:
            entries.append([f"{prefix}:absent", []])
            continue
        for name, value in module.state_dict().items():
            # ``get_extra_state`` entries (e.g. PCGrad's generator state) are not tensors:
            # they are recorded by name only, so their presence is still compared
            shape = list(value.shape) if isinstance(value, torch.Tensor) else ["extra"]
            entries.append([f"{prefix}.{name}", shape])
    return entries


def check_fingerprint(stored: Mapping[str, Any], current: Mapping[str, Any], ignore: frozenset[str] = frozenset()) -> None:
    """Raise ``ValueError`` when a stored fingerprint does not match the current run.

    Both fingerprints are ``{"tensors": model_fingerprint(...), "config": config dict}``;
    config fields named in ``ignore`` may differ.
    """
    stored_tensors = {name: shape for name, shape in stored.get("tensors", [])}
    current_tensors = {name: shape for name, shape in current.get("tensors", [])}
    if stored_tensors != current_tensors:
        missing = sorted(set(stored_tensors) - set(current_tensors))
        extra = sorted(set(current_tensors) - set(stored_tensors))
        reshaped = sorted(
            n for n in set(stored_tensors) & set(current_tensors) if list(stored_tensors[n]) != list(current_tensors[n])
        )
        parts = []
        if missing:
            parts.append(f"only in the checkpoint: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"only in the current run: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        if reshaped:
            parts.append(
                "different shapes: "
                + ", ".join(f"{n} {stored_tensors[n]} vs {current_tensors[n]}" for n in reshaped[:5])
            )
        banks_stored = any(".banks." in n for n in stored_tensors)
        banks_current = any(".banks." in n for n in current_tensors)
        if banks_stored != banks_current:  # the same architecture in the other experts= form
            form = "bank" if banks_stored else "modules"
            parts.append(f'the checkpoint\'s model stores its experts as experts="{form}": build the model with '
                         f'experts="{form}" to resume it (a model state_dict alone loads into either form)')
        raise ValueError("checkpoint was written for a different model: " + "; ".join(parts))
    if "settings" in stored:  # checkpoints written before settings were recorded skip this
        stored_settings, current_settings = dict(stored["settings"]), dict(current.get("settings", {}))
        if stored_settings != current_settings:
            diff = [
                f"{k}: checkpoint {stored_settings.get(k, '<absent>')!r} vs current {current_settings.get(k, '<absent>')!r}"
                for k in sorted(set(stored_settings) | set(current_settings))
                if stored_settings.get(k, "<absent>") != current_settings.get(k, "<absent>")
            ]
            raise ValueError("checkpoint was written with different settings: " + "; ".join(diff))
    stored_config = {k: v for k, v in dict(stored.get("config", {})).items() if k not in ignore}
    current_config = {k: v for k, v in dict(current.get("config", {})).items() if k not in ignore}
    if stored_config != current_config:
        keys = sorted(set(stored_config) | set(current_config))
        diff = [
            f"{k}: checkpoint {stored_config.get(k, '<absent>')!r} vs current {current_config.get(k, '<absent>')!r}"
            for k in keys
            if stored_config.get(k, "<absent>") != current_config.get(k, "<absent>")
        ]
        raise ValueError("checkpoint was written with a different TrainerConfig: " + "; ".join(diff))
