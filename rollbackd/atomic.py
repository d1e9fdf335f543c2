"""Atomic file replacement: temporary file, fsync, rename, fsync of the directory.

The replacement keeps what decides who may read the file: its group, mode and POSIX ACL
(and its owner when running as root), or it is not made at all.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

_DEFAULT_MODE = 0o644
ACL_XATTR = "system.posix_acl_access"


class NotRegularFileError(OSError):
    """The path exists but is not a regular file (a FIFO, a device, a directory ...)."""


class AccessNotKeptError(OSError):
    """The replacement could not keep the group, mode, ACL or owner its readers rely on."""


def file_kind(mode: int) -> str:
    """Name the kind of file ``mode`` describes, for messages (``a FIFO``, ``a directory``)."""
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def require_regular(path: Path, st: os.stat_result) -> None:
    """Raise NotRegularFileError naming ``path`` and its kind unless it is a regular file."""
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFileError(
            errno.EINVAL,
            f"{path} is {file_kind(st.st_mode)}, not a regular file: point the action at "
            "the file its readers load",
        )


@dataclass(frozen=True, slots=True)
class Access:
    """Who may read a file: owner, group, mode bits and the raw POSIX access ACL (or None)."""

    uid: int
    gid: int
    mode: int
    acl: bytes | None

    @classmethod
    def of(cls, st: os.stat_result, target: int | Path) -> Access:
        """The access of ``target`` (an open descriptor or a path) whose stat is ``st``."""
        return cls(st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), _read_acl(target))


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path``'s content at once: temp file beside it, fsync, rename, fsync the directory.

    The file keeps its group, mode and POSIX ACL (and owner, when running as root); when it
    cannot, AccessNotKeptError says why and the file is left as it was. A symlink is followed
    so the link stays a link; a target that is not a regular file is refused
    (NotRegularFileError). Blocking: call it from a thread.
    """
    target = Path(os.path.realpath(path))
    try:
        st = target.stat()
    except FileNotFoundError:
        previous: Access | None = None
    else:
        require_regular(target, st)
        previous = Access.of(st, target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if previous is None:
                os.fchmod(fd, _DEFAULT_MODE)
            else:
                _keep_access(fd, target, previous)
            os.fsync(fd)
        tmp.replace(target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(target.parent)


def _keep_access(fd: int, target: Path, previous: Access) -> None:
    """Give the new file ``previous``'s owner (as root), group, ACL and mode, then check it."""
    euid = os.geteuid()
    uid = previous.uid if euid == 0 else -1
    if (uid, previous.gid) != (-1, os.fstat(fd).st_gid):
        try:
            os.fchown(fd, uid, previous.gid)
        except PermissionError as exc:
            raise AccessNotKeptError(exc.errno, _group_refused(target, previous)) from exc
    try:
        if previous.acl is not None:
            os.setxattr(fd, ACL_XATTR, previous.acl)
        else:  # an ACL inherited from the directory's default must not widen or narrow access
            with contextlib.suppress(OSError):
                os.removexattr(fd, ACL_XATTR)
    except OSError as exc:
        raise AccessNotKeptError(
            exc.errno, f"cannot copy the POSIX ACL of {target} to its replacement: {exc.strerror}"
        ) from exc
    os.fchmod(fd, previous.mode)
    now = Access.of(os.fstat(fd), fd)
    if euid not in (0, previous.uid):
        _check_old_owner(target, previous)
    kept = (now.gid, now.mode, now.acl) == (previous.gid, previous.mode, previous.acl)
    if not kept or (euid == 0 and now.uid != previous.uid):
        raise AccessNotKeptError(
            errno.EPERM,
            f"the replacement of {target} would not keep its access: it is "
            f"{_describe(previous)}, the new file would be {_describe(now)}",
        )


def _group_refused(target: Path, previous: Access) -> str:
    user = _user_name(os.geteuid())
    try:
        name = grp.getgrgid(previous.gid).gr_name
    except KeyError:
        name = str(previous.gid)
    return (
        f"{target} belongs to group {_group_name(previous.gid)}, which rollbackd's user {user} "
        "is not a member of, so a rewritten file could not keep that group and its readers "
        f"would lose access: add the user to group {name} (systemd: SupplementaryGroups={name})"
    )


def _check_old_owner(target: Path, previous: Access) -> None:
    """As a non-root user the new file is ours: its old owner must still read it."""
    if previous.uid == 0:
        return  # root reads whatever the mode says
    try:
        entry = pwd.getpwuid(previous.uid)
    except KeyError:
        groups: list[int] = []
    else:
        groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
    readable = previous.mode & (stat.S_IRGRP if previous.gid in groups else stat.S_IROTH)
    if not readable:
        owner = _user_name(previous.uid)
        raise AccessNotKeptError(
            errno.EPERM,
            f"{target} is owned by {owner}, who reads it as its owner; rewritten by "
            f"{_user_name(os.geteuid())} it would be owned by that user and {owner} could no "
            f"longer read it: make the file group-readable by a group that {owner} and "
            "rollbackd's user share, or run rollbackd as the file's owner",
        )


def _read_acl(target: int | Path) -> bytes | None:
    try:
        return os.getxattr(target, ACL_XATTR)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise


def _describe(access: Access) -> str:
    acl = "with a POSIX ACL" if access.acl else "without an ACL"
    owner, group = _user_name(access.uid), _group_name(access.gid)
    return f"owner {owner}, group {group}, mode {access.mode:04o}, {acl}"


def _user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _group_name(gid: int) -> str:
    try:
        return f"{grp.getgrgid(gid).gr_name} (gid {gid})"
    except KeyError:
        return f"gid {gid}"


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable: it lives in the directory's entry, not in the file."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
