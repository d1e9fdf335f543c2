"""File actions keep their readers' access: run as an unprivileged service user, as in production.

As root (CI), each test module creates a service user, an application user and groups, runs
flag.file / route.file as the service user in a subprocess, and reads the result as the
application would; the users and groups are removed afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rollbackd.atomic import ACL_XATTR, atomic_write

REPO = Path(__file__).resolve().parent.parent

# Everything is imported as root, then the process becomes the service user (uid, gid and
# groups, as systemd's User= and SupplementaryGroups= do): the interpreter and the checkout
# may live where that user cannot read (CI's Python is under /root).
ACTION_SCRIPT = """
import asyncio, concurrent.futures.thread, json, os, sys  # loaded lazily elsewhere
from rollbackd.actions.files import FLAG_FILE, ROUTE_FILE
from rollbackd.plan import attempt_once
from tests.test_actions_files import context
uid, gid, groups = json.loads(sys.argv[1])
os.setgroups(groups)
os.setgid(gid)
os.setuid(uid)
kind = FLAG_FILE if sys.argv[2] == "flag.file" else ROUTE_FILE
action = kind.build("act", kind.options.model_validate(json.loads(sys.argv[3])))
print(json.dumps(asyncio.run(attempt_once(action, context(), 10.0))))
"""

FLAGS = """{
  "flags": {
    "boop": {"variants": {"on": true, "off": false}, "defaultVariant": "on"}
  }
}
"""

# Linux's xattr form of a POSIX ACL (acl_ea.h): a version, then (tag, perm, id) entries.
_ACL_VERSION = 2
USER_OBJ, USER, GROUP_OBJ, MASK, OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_NO_ID = 0xFFFFFFFF


def acl(*entries: tuple[int, int, int | None]) -> bytes:
    """Encode ``(tag, perm, id)`` entries, sorted by tag then id, as an access ACL xattr."""
    body = b"".join(
        struct.pack("<HHI", tag, perm, _NO_ID if i is None else i) for tag, perm, i in entries
    )
    return struct.pack("<I", _ACL_VERSION) + body


@dataclass(frozen=True, slots=True)
class People:
    """Users and groups made for the module (names carry a random tag)."""

    svc: str  # rollbackd's service user: primary group svc, member of shared
    app: str  # the application reading the file: primary group app, member of shared
    outsider: str  # neither: primary group outsider
    shared: str  # the group the application reads its files through

    def gid(self, group: str) -> int:
        """The gid of one of the groups."""
        return int(
            subprocess.run(
                ["getent", "group", group], capture_output=True, text=True, check=True
            ).stdout.split(":")[2]
        )

    def uid(self, user: str) -> int:
        """The uid of one of the users."""
        return pwd.getpwnam(user).pw_uid


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture(scope="module")
def people() -> Iterator[People]:
    """Create the users and groups (root only), and remove them after the module."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip(
            "needs root and useradd to create an unprivileged service user (CI runs as root)"
        )
    tag = f"rbd{secrets.token_hex(3)}"
    p = People(svc=f"{tag}svc", app=f"{tag}app", outsider=f"{tag}out", shared=f"{tag}shr")
    groups = [p.svc, p.app, p.outsider, p.shared]
    users: list[str] = []
    try:
        for group in groups:
            _run("groupadd", group)
        for user, extra in ((p.svc, p.shared), (p.app, p.shared), (p.outsider, None)):
            more = ["-G", extra] if extra else []
            _run("useradd", "-M", "-N", "-s", "/usr/sbin/nologin", "-g", user, *more, user)
            users.append(user)
        yield p
    finally:
        for user in users:
            subprocess.run(["userdel", user], check=False, capture_output=True)
        for group in groups:
            subprocess.run(["groupdel", group], check=False, capture_output=True)


def as_user(user: str) -> dict[str, Any]:
    """``subprocess.run`` keywords that run a command as ``user`` with all of its groups."""
    entry = pwd.getpwnam(user)
    groups = os.getgrouplist(user, entry.pw_gid)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": groups}


@pytest.fixture
def etc(people: People) -> Iterator[Path]:
    """A directory like /etc/boop: group shared may write in it; the service user can reach it."""
    top = Path(tempfile.mkdtemp(prefix="rollbackd-access-"))  # pytest's tmp_path is 0700
    try:
        top.chmod(0o755)
        directory = top / "boop"
        directory.mkdir()
        os.chown(directory, 0, people.gid(people.shared))
        directory.chmod(0o775)
        yield directory
    finally:
        shutil.rmtree(top)


def _env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONDONTWRITEBYTECODE": "1"}


def make(path: Path, text: str, owner: str, group: str, *, mode: int, people: People) -> None:
    """Write ``text`` to ``path`` with that owner, group and mode."""
    path.write_text(text)
    os.chown(path, people.uid(owner), people.gid(group))
    path.chmod(mode)


def run_as_service(people: People, kind: str, **options: str) -> tuple[bool, str]:
    """Run one attempt of the action as the service user; ``(ok, detail)``."""
    who = as_user(people.svc)
    ids = json.dumps([who["user"], who["group"], who["extra_groups"]])
    result = subprocess.run(
        [sys.executable, "-c", ACTION_SCRIPT, ids, kind, json.dumps(options)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=_env(),
    )
    assert result.returncode == 0, result.stderr
    ok, detail, _ = json.loads(result.stdout.splitlines()[-1])  # after any log lines
    return ok, detail


def read_as(user: str, path: Path) -> str | None:
    """What ``user`` reads from ``path``; None when it is refused."""
    result = subprocess.run(
        ["cat", str(path)], capture_output=True, text=True, check=False, **as_user(user)
    )
    return result.stdout if result.returncode == 0 else None


def test_service_user_keeps_the_group_the_application_reads_through(
    people: People, etc: Path
) -> None:
    """flag.file run as the service user leaves a file the application still reads via group."""
    path = etc / "flags.json"
    make(path, FLAGS, people.app, people.shared, mode=0o640, people=people)
    ok, detail = run_as_service(people, "flag.file", path=str(path), flag="boop", variant="off")
    assert ok, detail
    st = path.stat()
    assert (st.st_gid, st.st_mode & 0o7777) == (people.gid(people.shared), 0o640)
    assert read_as(people.app, path) == FLAGS.replace(
        '"defaultVariant": "on"', '"defaultVariant": "off"'
    )


def outsider_reads(people: People) -> bytes:
    """An ACL granting ``people.outsider`` read access beside the owner's rw (group r, other -)."""
    return acl(
        (USER_OBJ, 6, None),
        (USER, 4, people.uid(people.outsider)),
        (GROUP_OBJ, 4, None),
        (MASK, 4, None),
        (OTHER, 0, None),
    )


def test_service_user_keeps_the_posix_acl(people: People, etc: Path) -> None:
    """A reader granted access by a POSIX ACL entry keeps it after route.file rewrites the file."""
    path = etc / "traffic.env"
    make(path, "BOOP_TRAFFIC_PERCENT=25\n", people.app, people.shared, mode=0o640, people=people)
    granted = outsider_reads(people)
    os.setxattr(path, ACL_XATTR, granted)
    assert read_as(people.outsider, path) is not None
    ok, detail = run_as_service(
        people, "route.file", path=str(path), key="BOOP_TRAFFIC_PERCENT", value="0"
    )
    assert ok, detail
    assert os.getxattr(path, ACL_XATTR) == granted
    assert read_as(people.outsider, path) == "BOOP_TRAFFIC_PERCENT=0\n"


def test_group_the_service_user_is_not_in_fails_the_step_and_keeps_the_file(
    people: People, etc: Path
) -> None:
    """A file in a group the service user cannot give is left alone; the step says why."""
    path = etc / "traffic.env"
    make(path, "BOOP_TRAFFIC_PERCENT=25\n", people.app, people.app, mode=0o644, people=people)
    inode = path.stat().st_ino
    ok, detail = run_as_service(
        people, "route.file", path=str(path), key="BOOP_TRAFFIC_PERCENT", value="0"
    )
    assert not ok
    assert detail.startswith(f"{path} left unchanged: {path} belongs to group {people.app} (gid ")
    assert f"which rollbackd's user {people.svc} (uid" in detail
    assert f"(systemd: SupplementaryGroups={people.app})" in detail
    assert (path.read_text(), path.stat().st_ino) == ("BOOP_TRAFFIC_PERCENT=25\n", inode)
    assert sorted(p.name for p in etc.iterdir()) == ["traffic.env"]


def test_owner_who_would_lose_access_fails_the_step(people: People, etc: Path) -> None:
    """A file whose owner reads it only as owner is not handed to the service user."""
    path = etc / "flags.json"
    make(path, FLAGS, people.outsider, people.shared, mode=0o640, people=people)
    ok, detail = run_as_service(people, "flag.file", path=str(path), flag="boop", variant="off")
    assert not ok
    assert f"is owned by {people.outsider} (uid" in detail
    assert "could no longer read it" in detail
    assert path.read_text() == FLAGS
    assert read_as(people.outsider, path) == FLAGS


def test_root_keeps_owner_group_mode_and_acl(people: People, tmp_path: Path) -> None:
    """Rewritten by root, a file keeps its owner and group as well as its mode and ACL."""
    path = tmp_path / "traffic.env"
    make(path, "A=1\n", people.app, people.shared, mode=0o640, people=people)
    granted = outsider_reads(people)
    os.setxattr(path, ACL_XATTR, granted)
    atomic_write(path, b"A=2\n")
    st = path.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (
        people.uid(people.app),
        people.gid(people.shared),
        0o640,
    )
    assert os.getxattr(path, ACL_XATTR) == granted


def test_acl_inherited_from_the_directory_does_not_widen_access(tmp_path: Path) -> None:
    """A file without an ACL stays without one, even in a directory with a default ACL."""
    directory = tmp_path / "boop"
    directory.mkdir()
    default = acl(
        (USER_OBJ, 7, None),
        (USER, 4, 65534),
        (GROUP_OBJ, 5, None),
        (MASK, 5, None),
        (OTHER, 5, None),
    )
    path = directory / "flags.json"
    path.write_text("{}")
    path.chmod(0o600)
    with contextlib.suppress(FileNotFoundError):
        os.setxattr(directory, "system.posix_acl_default", default)
    atomic_write(path, b"{ }")
    with pytest.raises(OSError):
        os.getxattr(path, ACL_XATTR)
    assert path.stat().st_mode & 0o7777 == 0o600
