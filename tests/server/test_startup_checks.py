"""`fastllava serve` checks its job store before anything else: a bad --queue URL, an unreachable
Redis, or a corrupt, foreign, read-only or full SQLite store ends it with exit code 2 and one
`error:` line naming the store, with no traceback, before the model is looked at. The --model
given does not exist, so a server that went on to load it would fail with a line about the
model instead (the control case shows that it does)."""

from __future__ import annotations

import os
import shlex
import socket
import sqlite3
import subprocess
import sys

import pytest

from fastllava.server.stores import open_store
DB = "jobs.sqlite3"            # the default store's file name under --data-dir


def sqlite_file(path, pages_to_corrupt=()):
    """A job store file with some jobs in it; the given 4 KiB pages overwritten."""
    store = open_store(f"sqlite:///{path}")
    for i in range(100):
        store.submit("o/a", "", {"prompt": "x" * 3000})
    store.close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    for page in pages_to_corrupt:
        data[page * 4096:(page + 1) * 4096] = b"\x5a" * 4096
    path.write_bytes(data)


def serve(tmp_path, *args, data_dir=None, mount=None):
    """Run `fastllava serve` with a missing model → (exit code, stderr). mount: a shell snippet
    run first in a private mount namespace (tmpfs sizes, read-only remounts) as root there."""
    model = tmp_path / "no-such-model"
    cmd = [sys.executable, "-m", "fastllava", "serve", "--model", str(model), "--port", "1",
           "--data-dir", str(data_dir or tmp_path / "data"), "--device", "cpu", *args]
    if mount is not None:
        cmd = ["unshare", "-rm", "sh", "-ec", f"{mount}; exec {shlex.join(cmd)}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    return done.returncode, done.stderr


def assert_store_refused(code, stderr, *names):
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, stderr)
    assert "Traceback" not in stderr and "no-such-model" not in stderr, stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def can_mount(tmp_path_factory):
    probe = tmp_path_factory.mktemp("mnt")
    ok = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "tmpfs", str(probe)],
                        capture_output=True).returncode == 0
    if not ok:
        pytest.skip("needs unshare with user and mount namespaces (a private tmpfs)")


def test_control_a_good_store_gets_as_far_as_the_missing_model(tmp_path):
    code, stderr = serve(tmp_path)
    assert code == 2 and "no-such-model" in stderr and "Traceback" not in stderr, stderr


@pytest.mark.parametrize("make_file, expect", [
    (lambda p: p.write_bytes(os.urandom(8192)), "not an SQLite database"),
    (lambda p: sqlite_file(p, pages_to_corrupt=[5]), "corrupt"),        # header intact
    (lambda p: sqlite3.connect(p).execute("CREATE TABLE jobs (x)").connection.commit(),
     "not a fastllava job store"),
], ids=["garbage", "malformed", "foreign"])
def test_a_bad_sqlite_file_is_one_line_before_the_model(tmp_path, make_file, expect):
    data = tmp_path / "data"
    data.mkdir()
    make_file(data / DB)
    line = assert_store_refused(*serve(tmp_path), str(data / DB))
    assert expect in line, line
    make_file(tmp_path / "other.db")                # the same through --queue
    assert_store_refused(*serve(tmp_path, "--queue", f"sqlite:///{tmp_path / 'other.db'}"),
                         str(tmp_path / "other.db"))


@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
def test_a_read_only_data_dir(tmp_path, can_mount, existing):
    data = tmp_path / "data"
    data.mkdir()
    if existing:
        sqlite_file(data / DB)
    mount = f"mount --bind {data} {data} && mount -o remount,bind,ro {data}"
    line = assert_store_refused(*serve(tmp_path, mount=mount), str(data / DB))
    assert "read-only" in line or "cannot be opened" in line, line


@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
def test_a_full_data_dir(tmp_path, can_mount, existing):
    data = tmp_path / "data"
    data.mkdir()
    fill = f"(cat /dev/zero > {data}/fill 2>/dev/null || true)"
    if existing:
        fill = (f"{shlex.quote(sys.executable)} -c 'from fastllava.server.stores import "
                f"open_store; open_store(\"sqlite:///{data / DB}\").close()' && {fill}")
    mount = f"mount -t tmpfs -o size=256k tmpfs {data} && {fill}"
    line = assert_store_refused(*serve(tmp_path, mount=mount), str(data / DB))
    assert "full" in line, line


def test_a_data_dir_that_cannot_be_made(tmp_path):
    (tmp_path / "file").write_text("")
    assert_store_refused(*serve(tmp_path, data_dir=tmp_path / "file" / "data"),
                         str(tmp_path / "file" / "data"))


def test_bad_queue_urls_and_an_unreachable_redis(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{s.getsockname()[1]}/0"      # nothing listens there
    with socket.socket() as mute:                   # accepts connections, never answers
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        silent = f"redis://127.0.0.1:{mute.getsockname()[1]}/0"
        for url in (dead, silent, "redis://127.0.0.1:notaport/0", "redis://127.0.0.1:1/x",
                    "postgres://db/x", "sqlite://host/x.db",
                    f"sqlite:///{tmp_path / 'missing-dir' / 'x.db'}", "jobs.db"):
            named = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url
            line = assert_store_refused(*serve(tmp_path, "--queue", url), named)
            assert "queue URL" in line or "job store" in line, line
