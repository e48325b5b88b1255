"""Finding a data file: explicit path, ``$MTLBOOK_DATA``, the user cache, then a download.

Every real data set in mtlbook is a handful of files with a known SHA-256. A loader asks
:func:`resolve_data_file` for one of them and gets back a local path whose content has been
checked. The search order is

1. the ``path`` the caller passed (a file, or a directory holding the file either directly
   or in the data set's sub-folder); when ``path`` is given nothing else is tried;
2. ``$MTLBOOK_DATA/<folder>/<name>`` (the layout of ``../shared/data``:
   ``census-income/census-income.test.gz``, ``cmapss/train_FD001.txt``, ...);
3. the user cache ``$XDG_CACHE_HOME/mtlbook/<folder>/<name>`` (default
   ``~/.cache/mtlbook``);
4. a download from the original source into the cache with `pooch
   <https://www.fatiando.org/pooch>`_ (a zip archive is searched, nested archives included,
   for the member with the file's name). pooch writes into a uniquely named temporary file
   next to the target, checks the SHA-256 and only then moves it into place, so two
   processes fetching the same file never collide and a killed download leaves nothing
   under the final name; an extracted archive member goes the same way.

A file found anywhere is hashed once per process, keyed by path, inode, size, modification
*and* change time (``st_ctime`` moves on every write and cannot be set back by the user, so a
same-size edit with the modification time restored is hashed again). The network is reached
only through :func:`_download`, which tests replace with a stub.

Errors are :class:`DataFileError` subclasses that are also the matching built-in:
:class:`DataFileNotFoundError` (a ``FileNotFoundError``) says which file, where it looked and
where to put it; :class:`DataFileChecksumError` (a ``ValueError``) names the file and the
expected and actual hashes; :class:`DataFileFormatError` (a ``ValueError``) names the file and
the line of a malformed row.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DataFile",
    "DataFileChecksumError",
    "DataFileError",
    "DataFileFormatError",
    "DataFileNotFoundError",
    "cache_dir",
    "file_sha256",
    "resolve_data_file",
    "verify_sha256",
]

DATA_ENV = "MTLBOOK_DATA"
_DOWNLOAD_TIMEOUT_S = 60


class DataFileError(Exception):
    """Base class of every data-file problem (missing, corrupt, malformed)."""


class DataFileNotFoundError(DataFileError, FileNotFoundError):
    """A data file is nowhere to be found and could not be downloaded."""


class DataFileChecksumError(DataFileError, ValueError):
    """A data file's SHA-256 differs from the published one (corrupt or wrong file)."""


class DataFileFormatError(DataFileError, ValueError):
    """A data file parses badly; the message names the file and the line."""


@dataclass(frozen=True)
class DataFile:
    """One file of a data set.

    Args:
        folder: the data set's sub-folder under a data root (``"census-income"``, ``"cmapss"``).
        name: the file name (``"census-income.test.gz"``).
        sha256: the published SHA-256 (lower-case hex), or ``None`` when none is known (the
            file is then used unchecked).
        url: where the original is downloaded from, or ``None`` if it cannot be.
        in_archive: ``True`` when ``url`` is a zip archive holding ``name`` (possibly inside a
            nested zip) rather than the file itself.
    """

    folder: str
    name: str
    sha256: str | None
    url: str | None = None
    in_archive: bool = False

    @property
    def relative(self) -> Path:
        """``folder/name``: where the file sits under ``$MTLBOOK_DATA`` or the cache."""
        return Path(self.folder) / self.name


def cache_dir() -> Path:
    """The user cache: ``$XDG_CACHE_HOME/mtlbook``, else ``~/.cache/mtlbook`` (not created)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "mtlbook"


# (resolved path, inode, size, mtime_ns, ctime_ns) -> hex digest; hashed at most once per process.
_HASH_CACHE: dict[tuple[str, int, int, int, int], str] = {}


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, memoised per process on (path, inode, size, mtime, ctime)."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = _hash_file(resolved)
    return _HASH_CACHE[key]


def verify_sha256(path: str | os.PathLike, expected: str | None, *, label: str | None = None) -> Path:
    """Check ``path`` against ``expected`` (skipped when ``expected`` is ``None``).

    Raises:
        DataFileChecksumError: naming the file, the expected and the actual hash.
    """
    path = Path(path)
    if expected is None:
        return path
    actual = file_sha256(path)
    if actual != expected.lower():
        raise DataFileChecksumError(
            f"{label or path.name}: SHA-256 mismatch for {path} (corrupt or wrong file): "
            f"expected {expected.lower()}, got {actual}. Delete it and put a fresh copy there."
        )
    return path


def _download(url: str, destination: Path) -> None:
    """Fetch ``url`` into ``destination`` (the only place mtlbook touches the network).

    pooch calls this with a temporary ``destination`` of its own; tests replace it.
    """
    import pooch

    pooch.HTTPDownloader(progressbar=False, timeout=_DOWNLOAD_TIMEOUT_S, headers={"User-Agent": "mtlbook"})(
        url, str(destination), None
    )


def _pooch_fetch(url: str, folder: Path, fname: str, sha256: str | None) -> Path:
    """``pooch.retrieve`` into ``folder/fname`` through :func:`_download`, hash-checked.

    A file already there is reused when its hash matches (or when no hash is given).
    """
    import pooch

    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)  # no "Downloading data from ..." on stderr
    try:
        fetched = pooch.retrieve(
            url,
            known_hash=None if sha256 is None else f"sha256:{sha256.lower()}",
            fname=fname,
            path=folder,
            downloader=lambda u, output, _pooch: _download(u, Path(output)),
            progressbar=False,
        )
    finally:
        logger.setLevel(level)
    return Path(fetched)


def _find_member(archive: zipfile.ZipFile, name: str, depth: int = 0) -> bytes | None:
    """Bytes of the member whose base name is ``name``, searching nested zips (3 levels)."""
    for info in archive.infolist():
        if not info.is_dir() and Path(info.filename).name == name:
            return archive.read(info)
    if depth >= 3:
        return None
    for info in archive.infolist():
        if info.filename.lower().endswith(".zip"):
            with zipfile.ZipFile(io.BytesIO(archive.read(info))) as inner:
                found = _find_member(inner, name, depth + 1)
            if found is not None:
                return found
    return None


def _archive_path(data_file: DataFile, cache_folder: Path) -> Path:
    """Where a downloaded archive is kept, so the other files in it need no new download."""
    assert data_file.url is not None
    digest = hashlib.sha256(data_file.url.encode()).hexdigest()[:12]
    return cache_folder / f"archive-{digest}.zip"


def _fetch_into_cache(data_file: DataFile, target: Path, verify: bool) -> Path:
    """Download ``data_file`` to ``target`` with pooch, checking its hash.

    For an archive source the zip is kept in the cache folder (its members are what gets
    verified), so the sibling files of the same archive are extracted without a new download;
    the member is written to a unique temporary file, verified, then moved into place.
    """
    assert data_file.url is not None
    target.parent.mkdir(parents=True, exist_ok=True)
    expected = data_file.sha256 if verify else None
    label = f"{data_file.name} (downloaded from {data_file.url})"
    if not data_file.in_archive:
        try:
            return _pooch_fetch(data_file.url, target.parent, target.name, expected)
        except ValueError as error:
            if expected is not None and "hash" in str(error).lower():
                raise DataFileChecksumError(
                    f"{label}: SHA-256 mismatch (corrupt or wrong file): expected {expected.lower()}; {error}"
                ) from None
            raise
    archive_path = _archive_path(data_file, target.parent)
    archive_path = _pooch_fetch(data_file.url, target.parent, archive_path.name, None)
    try:
        with zipfile.ZipFile(archive_path) as archive:
            content = _find_member(archive, data_file.name)
    except zipfile.BadZipFile:
        archive_path.unlink(missing_ok=True)  # a damaged download must not be reused
        raise
    if content is None:
        raise DataFileNotFoundError(f"{data_file.name} is not inside the archive downloaded from {data_file.url}")
    fd, partial_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    partial = Path(partial_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
        if expected is not None:
            verify_sha256(partial, expected, label=label)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _candidates_under(path: Path, data_file: DataFile) -> list[Path]:
    if path.is_dir():
        return [path / data_file.name, path / data_file.relative]
    return [path]


def resolve_data_file(
    data_file: DataFile,
    path: str | os.PathLike | None = None,
    *,
    download: bool = True,
    verify: bool = True,
) -> Path:
    """Return a local, checksum-verified path to ``data_file`` (search order: module docstring).

    Args:
        data_file: which file.
        path: an explicit file, or a directory holding it (directly or in ``folder/``).
            When given, only this location is searched.
        download: allow fetching the original into the cache when the file is nowhere.
        verify: check the SHA-256 (leave ``True`` unless you load a file you made yourself).

    Raises:
        DataFileNotFoundError: the file is missing and could not be downloaded.
        DataFileChecksumError: the file found or downloaded has the wrong SHA-256.
    """
    expected = data_file.sha256 if verify else None
    if path is not None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        explicit = Path(path).expanduser()
        candidates = _candidates_under(explicit, data_file)
        for candidate in candidates:
            if candidate.is_file():
                return verify_sha256(candidate, expected, label=data_file.name)
        tried = ", ".join(str(c) for c in candidates)
        raise DataFileNotFoundError(
            f"{data_file.name} not found at the given path; looked at: {tried}. Pass the file "
            f"itself or a directory holding {data_file.name} (or {data_file.relative})."
        )

    looked: list[Path] = []
    root = os.environ.get(DATA_ENV)
    if root:
        candidate = Path(root).expanduser() / data_file.relative
        looked.append(candidate)
        if candidate.is_file():
            return verify_sha256(candidate, expected, label=data_file.name)
    cached = cache_dir() / data_file.relative
    looked.append(cached)
    if cached.is_file():
        return verify_sha256(cached, expected, label=data_file.name)

    reason = "downloading is switched off (download=False)"
    if download and data_file.url is None:
        reason = "no download source is known for it"
    elif download:
        try:
            return _fetch_into_cache(data_file, cached, verify)
        except DataFileChecksumError:
            raise
        except Exception as exc:  # any network/archive failure ends in the same advice
            reason = f"download from {data_file.url} failed: {type(exc).__name__}: {exc}"
            raise DataFileNotFoundError(_missing_message(data_file, looked, root, reason)) from exc
    raise DataFileNotFoundError(_missing_message(data_file, looked, root, reason))


def _missing_message(data_file: DataFile, looked: list[Path], root: str | None, reason: str) -> str:
    env_hint = (
        f"${DATA_ENV}/{data_file.relative} (${DATA_ENV} is {root})"
        if root
        else f"${DATA_ENV}/{data_file.relative} (set ${DATA_ENV} to a data directory)"
    )
    source = f" The original is at {data_file.url}." if data_file.url else ""
    return (
        f"{data_file.name} not found; looked in: {', '.join(str(p) for p in looked)}; {reason}. "
        f"Put the file at {env_hint} or at {cache_dir() / data_file.relative}, or pass "
        f"path=<file or directory>.{source}"
    )
