"""Downloads through pooch, against a local HTTP server on the loopback interface only.

Concurrent fetches of one file (which collided on a fixed ``.part`` name before pooch),
a corrupt download refused and not kept, and the checksum memo that a same-size edit with
the modification time put back can no longer fool.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mtlbook.data import DataFileChecksumError, DataFileNotFoundError
from mtlbook.data import _files
from mtlbook.data._files import DataFile, file_sha256, resolve_data_file

PAYLOAD = os.urandom(256 * 1024)
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _SlowHandler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at /good.bin and garbage at /bad.bin, in slow chunks so fetches overlap."""

    hits: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        type(self).hits.append(self.path)
        body = PAYLOAD if self.path == "/good.bin" else b"garbage" * 1000
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for start in range(0, len(body), 32 * 1024):
            self.wfile.write(body[start : start + 32 * 1024])
            time.sleep(0.01)

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture()
def server(monkeypatch, tmp_path):
    monkeypatch.delenv("MTLBOOK_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _SlowHandler.hits = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_concurrent_downloads_of_one_file_do_not_collide(server, tmp_path):
    data_file = DataFile("demo", "good.bin", SHA, f"{server}/good.bin")
    with ThreadPoolExecutor(max_workers=5) as pool:
        paths = list(pool.map(lambda _: resolve_data_file(data_file), range(5)))
    target = tmp_path / "cache" / "mtlbook" / "demo" / "good.bin"
    assert all(p == target for p in paths)
    assert target.read_bytes() == PAYLOAD
    assert sorted(p.name for p in target.parent.iterdir()) == ["good.bin"]  # no temporary files left
    assert 1 <= len(_SlowHandler.hits) <= 5


def test_a_corrupt_download_is_refused_and_not_kept(server, tmp_path):
    data_file = DataFile("demo", "bad.bin", SHA, f"{server}/bad.bin")
    with pytest.raises(DataFileChecksumError, match="bad.bin"):
        resolve_data_file(data_file)
    folder = tmp_path / "cache" / "mtlbook" / "demo"
    assert not folder.exists() or list(folder.iterdir()) == []


def test_an_unreachable_source_says_where_to_put_the_file(monkeypatch, tmp_path):
    monkeypatch.delenv("MTLBOOK_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data_file = DataFile("demo", "gone.bin", SHA, "http://127.0.0.1:9/gone.bin")  # discard port: refused
    with pytest.raises(DataFileNotFoundError, match=r"Put the file at \$MTLBOOK_DATA/demo/gone.bin"):
        resolve_data_file(data_file)


def test_checksum_memo_is_not_fooled_by_a_same_size_edit_with_the_mtime_put_back(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"aaaa")
    first = file_sha256(target)
    stat = target.stat()
    time.sleep(0.01)
    target.write_bytes(b"bbbb")  # same size
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # modification time put back
    assert target.stat().st_mtime_ns == stat.st_mtime_ns and target.stat().st_size == stat.st_size
    assert file_sha256(target) == hashlib.sha256(b"bbbb").hexdigest() != first


def test_the_download_goes_through_pooch(monkeypatch, server, tmp_path):
    calls = []
    real = _files._pooch_fetch

    def spy(url, folder, fname, sha256):
        calls.append((url, Path(folder).name, fname, sha256))
        return real(url, folder, fname, sha256)

    monkeypatch.setattr(_files, "_pooch_fetch", spy)
    resolve_data_file(DataFile("demo", "good.bin", SHA, f"{server}/good.bin"))
    assert calls == [(f"{server}/good.bin", "demo", "good.bin", SHA)]
