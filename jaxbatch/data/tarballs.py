"""Tarballs read member by member into memory: nothing is ever extracted to disk.

Image folders (`<split>.tar.gz`) and CIFAR-10's official archives are read
with `tarfile`, one member's bytes at a time; jaxbatch never calls
`extract`, so no archive can write anywhere, whatever its member names say.
Members that only an extractor could misuse (symbolic and hard links,
devices, FIFOs, absolute paths, paths through `..`) are refused all the
same, with one line naming the member: an archive of images has no use for
them, and skipping them quietly would hide the images behind a link.

Two things tarfile leaves unchecked are checked here:
  * a member's size, from its header, against a limit, before its bytes are
    read: tarfile's read() allocates what the header claims at once, and a
    gzip bomb (a member of gigabytes of zeros) would be read whole;
  * the archive's end: tarfile stops quietly at a damaged header or at a cut
    between members, dropping every member after it. What follows the last
    member must be the end-of-archive marker, zero blocks; reading a .tar.gz
    to its end also checks its CRC.
"""

from __future__ import annotations

import tarfile
import zlib
from pathlib import Path

from jaxbatch.data.catalog import one_line
from jaxbatch.errors import JaxbatchError

CHUNK = 1 << 20  # bytes read at a time
ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)  # what tarfile and gzip raise on damage


def member_label(path: Path, name: str) -> str:
    """`<tarball>:<member>` for messages; names that are not printable text are quoted."""
    return f"{path}:{name if name.isprintable() else ascii(name)}"


def members(path: Path, fix: str):
    """Yield (member, where, read) for each member of the tarball at `path`, in archive order.

    `read(limit, what)` returns a file member's bytes, refusing one larger
    than `limit` bytes (`what` names what it should be). A damaged archive
    fails with one line ending in `fix`; an unsafe member (see check_member)
    fails too.
    """
    try:
        with tarfile.open(path, "r:" if path.suffix == ".tar" else "r:gz") as tar:
            for member in tar:
                where = member_label(path, member.name)
                check_member(member, where)
                yield member, where, _reader(tar, member, path, where, fix)
            _check_end(tar, path, fix)
    except ERRORS as err:
        raise JaxbatchError(f"{path}: corrupt or truncated archive ({one_line(err)}); {fix}")


def check_member(member: tarfile.TarInfo, where: str) -> None:
    """Refuse a member that is not a plain file or folder inside the archive's own tree."""
    if member.name.startswith("/"):
        raise JaxbatchError(f"{where}: member has an absolute path; repack the archive with relative paths")
    if ".." in member.name.split("/"):
        raise JaxbatchError(f"{where}: member path leads out of the archive through '..'; "
                            "repack the archive without '..' in its paths")
    if member.issym() or member.islnk():
        kind, option = ("symbolic", "--dereference") if member.issym() else ("hard", "--hard-dereference")
        raise JaxbatchError(f"{where}: member is a {kind} link (to {ascii(member.linkname)}); "
                            f"repack the archive with the files themselves (tar {option})")
    if not (member.isfile() or member.isdir()):
        kind = ("a character device" if member.ischr() else "a block device" if member.isblk()
                else "a FIFO" if member.isfifo() else f"a tar entry of type {member.type!r}")
        raise JaxbatchError(f"{where}: member is {kind}, not a file or folder; "
                            "repack the archive with files and folders only")


def _reader(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path, where: str, fix: str):
    def read(limit: int, what: str) -> bytes:
        if member.size > limit:
            raise JaxbatchError(f"{where}: member of {member.size} bytes, more than {limit} for {what}; "
                                "the archive is corrupt or not the expected one")
        try:
            return tar.extractfile(member).read()  # allocates member.size at once: checked just above
        except ERRORS as err:
            raise JaxbatchError(f"{path}: corrupt or truncated archive ({one_line(err)}); {fix}")

    return read


def _check_end(tar: tarfile.TarFile, path: Path, fix: str) -> None:
    """After the last member must come at least one zero block, and nothing but zeros."""
    tar.fileobj.seek(tar.offset)  # where tarfile stopped: the marker, a damaged header, or the end
    zeros = 0
    while chunk := tar.fileobj.read(CHUNK):
        if chunk.strip(b"\0"):
            raise JaxbatchError(f"{path}: unreadable data at byte {tar.offset + zeros} of the archive "
                                f"(a damaged member header?); {fix}")
        zeros += len(chunk)
    if zeros < tarfile.BLOCKSIZE:
        raise JaxbatchError(f"{path}: the archive stops without its end-of-archive marker "
                            f"(truncated after byte {tar.offset}); {fix}")
