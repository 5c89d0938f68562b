"""Where files live: opening inputs, and output that appears complete or not at all.

Locations are local paths or URIs pyarrow can open (s3://, gs://, hdfs://, file://). On a
multi-node cluster the driver's local disk is not the workers', so outputs that every node must
reach go to a URI or a shared mount.

Completeness: a local output folder is assembled beside its final place and renamed into it
(`staged_dir`). Object stores have no rename, so a remote output folder is written in place
with its completion record (run.json, predict.json) last; readers check for that record.

Ownership: an output replaces only what the same command wrote before (`Output`), and a file
is read whole only up to a size that such a file can have (`read_at_most`).
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from digit_models.errors import DigitsError, first_line


# The standard variables that tell S3 clients (pyarrow's among them) where the store is and who
# is asking. Processes that do not inherit the driver's environment need them handed over
# (runtime/ray_runtime.py).
AWS_ENVIRONMENT = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)


def is_uri(location: str) -> bool:
    return "://" in str(location)


def split_query(location: str) -> tuple[str, str]:
    """A location's path part and its query with the "?" (or ""): a URI may carry settings
    after the path (`s3://bucket/run?endpoint_override=host:9000&scheme=http`), and names of
    entries go before them. In a local path "?" is an ordinary character."""
    base, mark, query = str(location).partition("?")
    return (base, mark + query) if is_uri(location) else (str(location), "")


def without_credentials(text: str) -> str:
    """`text` (a location, or a message or record naming locations) with every URI in it
    stripped of its credentials: a userinfo with a password (`KEY:SECRET@`, the key with it)
    and query parameters that carry secrets. Whatever we record, print or send to MLflow goes
    through this; the location itself, credentials and all, is what pyarrow gets."""
    return _URI.sub(lambda found: _uri_without_credentials(found.group()), text)


# A URI inside text: it ends at whitespace, a quote or a backslash (JSON's escapes), and not
# on punctuation that follows it in a message ("s3://b/x: no such file"). Not matched from
# inside a longer word, which keeps a scan through long base64 runs linear.
_URI = re.compile(r"""(?<![\w+.-])[A-Za-z][\w+.-]*://[^\s"'<>\\]*[^\s"'<>\\:,.;)\]]""")
# A userinfo with a password. The password runs to the first "@", over any "/": an AWS
# secret may hold a raw "/", and pyarrow's refusal of such a URI quotes it whole. A userinfo
# without a password names no secret and stays (abfs://CONTAINER@account..., hdfs://USER@host).
_USERINFO = re.compile(r"^([^:/?#]+://)[^:/?#@]*:[^?#@]*@")
# Query parameters that carry secrets: pyarrow reads Azure's `client_secret` and a SAS
# token's signature `sig` from a URI (its S3 and GCS URIs take credentials only as userinfo,
# and refuse `secret_key=`, `session_token=`, `access_token=` in a message that quotes ours).
_SECRET_PARAMETER = re.compile(r"secret|token|key|password|signature|^sig$", re.IGNORECASE)


def _uri_without_credentials(uri: str) -> str:
    base, mark, query = _USERINFO.sub(r"\1", uri).partition("?")
    kept = [pair for pair in query.split("&") if not _SECRET_PARAMETER.search(pair.partition("=")[0])]
    return base + (mark + "&".join(kept) if kept else "")


def parent_and_name(location: str) -> tuple[str, str]:
    """The folder a file location is in (with the URI's query) and the file's name."""
    base, query = split_query(location)
    parent, _, name = base.rstrip("/").rpartition("/")
    return (parent or ("/" if base.startswith("/") else ".")) + query, name


def shown_name(location: str) -> str:
    """The last part of a location, as titles and names show it: without credentials."""
    return parent_and_name(without_credentials(location))[1]


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path within it; local paths become absolute. An S3
    location is checked to be reachable with the settings given (once per bucket and
    settings in a process), so that bad ones are one line before anything starts."""
    if is_uri(location):
        try:
            fs, path = pafs.FileSystem.from_uri(str(location))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
            raise DigitsError(f"{location}: cannot open: {first_line(exc)}") from None
        if isinstance(fs, pafs.S3FileSystem):
            _require_s3_reachable(str(location), fs, path)
        return fs, path
    return pafs.LocalFileSystem(), os.path.abspath(location)


_S3_BUCKETS_REACHED: set[tuple] = set()

# Enough for a network blip, and a refused connection fails in under a second: pyarrow's
# default retries took 6 s to give up on an endpoint that refused every connection.
S3_CHECK_ATTEMPTS = 2


def _require_s3_reachable(location: str, fs: pafs.S3FileSystem, path: str) -> None:
    """Asks the store about `path` with the filesystem's own settings but few retries, and
    turns what a wrong setting gives (pyarrow's multi-line OSErrors, or for a missing bucket
    nothing at all: every path in it reads as not found) into one line."""
    bucket = path.split("/", 1)[0]
    settings = fs.__reduce__()[1][0]  # the constructor's arguments, as pickling uses them
    reached = (bucket, repr(sorted(settings.items())), tuple(os.environ.get(name) for name in AWS_ENVIRONMENT))
    if reached in _S3_BUCKETS_REACHED:
        return
    checking = pafs.S3FileSystem(
        **settings, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_CHECK_ATTEMPTS)
    )
    try:
        found = checking.get_file_info(path)
    except OSError as exc:
        raise DigitsError(f"{location}: {_s3_problem(exc, settings)}") from None
    if found.type == pafs.FileType.NotFound and _s3_bucket_missing(checking, bucket):
        raise DigitsError(f"{location}: no such bucket")
    _S3_BUCKETS_REACHED.add(reached)


def _s3_bucket_missing(fs: pafs.S3FileSystem, bucket: str) -> bool:
    """Whether the store says there is no such bucket. Asked only once the path has not been
    found (a missing bucket's paths all read as not found), and a refusal means "cannot tell":
    keys limited to a prefix may read and write there but not ask about the bucket."""
    try:
        return fs.get_file_info(bucket).type == pafs.FileType.NotFound
    except OSError:
        return False


def _s3_problem(exc: OSError, settings: dict) -> str:
    """What went wrong, from the AWS error code pyarrow's message carries."""
    text = str(exc)
    if "NETWORK_CONNECTION" in text:
        endpoint = settings["endpoint_override"]
        if endpoint and "://" not in endpoint:
            endpoint = f"{settings['scheme']}://{endpoint}"
        return f"cannot reach the endpoint {endpoint or 'of AWS S3'}"
    if "ACCESS_DENIED" in text:  # what a HEAD request gives for a wrong key or secret
        return "access denied (check the keys and their permissions)"
    return f"cannot open: {first_line(exc)}"


def require_file(location: str) -> tuple[pafs.FileSystem, str]:
    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DigitsError(f"{location}: no such file")
    if info.type == pafs.FileType.Directory:
        raise DigitsError(f"{location}: is a directory, expected a file")
    if not is_uri(location) and not os.access(path, os.R_OK):
        raise DigitsError(f"{location}: permission denied")
    return fs, path


def open_binary(location: str):
    """A readable byte stream; .gz files are decompressed transparently."""
    fs, path = require_file(location)
    try:
        return fs.open_input_stream(path, compression="detect")
    except OSError as exc:
        raise DigitsError(f"{location}: cannot open: {first_line(exc)}") from None


def read_at_most(stream, limit: int, location: str, what: str) -> bytes:
    """The rest of a stream, refusing more than `limit` bytes as read (decompressed, for a .gz:
    a small file can hold a great many). Read a megabyte at a time, so that nothing over the
    limit is ever held."""
    chunks, size = [], 0
    while chunk := stream.read(min(1 << 20, limit + 1 - size)):
        size += len(chunk)
        if size > limit:
            raise DigitsError(
                f"{location}: more than {limit >> 20} MiB"
                f"{' decompressed' if split_query(location)[0].endswith('.gz') else ''}"
                f"; too large for {what}"
            )
        chunks.append(chunk)
    return b"".join(chunks)


# predict.json lists every input file (about 250 bytes each), the largest of our records:
# a quarter of a million files. A larger "record" is not ours.
RECORD_BYTES = 64 << 20


def file_sha256(location: str) -> str:
    fs, path = require_file(location)
    digest = hashlib.sha256()
    with fs.open_input_stream(path, compression=None) as stream:  # the bytes as stored, not decompressed
        for chunk in iter(lambda: stream.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Folder:
    """A folder that is local or behind a URI, with the few operations our outputs need."""

    def __init__(self, location: str):
        base, query = split_query(location)
        self.location = (base.rstrip("/") or "/") + query
        self.fs, self.path = filesystem(self.location)
        self.is_local = not is_uri(self.location)

    def __str__(self) -> str:
        return self.location

    def child(self, name: str) -> str:
        """The location (path or URI) of an entry, in the form the user gave (a URI's query,
        if any, kept after the name)."""
        base, query = split_query(self.location)
        return f"{base}/{name}{query}"

    def _type(self, name: str = "") -> pafs.FileType:
        return self.fs.get_file_info(f"{self.path}/{name}" if name else self.path).type

    def exists(self, name: str = "") -> bool:
        return self._type(name) != pafs.FileType.NotFound

    def is_file(self, name: str) -> bool:
        return self._type(name) == pafs.FileType.File

    def is_folder(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def create(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def names(self) -> list[str]:
        """The names of the entries in this folder (none if it does not exist), sorted."""
        found = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted(info.base_name for info in found)

    def read_bytes(self, name: str, limit: int | None = None) -> bytes:
        """The whole file; with a limit, refused (DigitsError) when it is larger."""
        with self.fs.open_input_stream(f"{self.path}/{name}") as stream:
            if limit is None:
                return stream.read()
            return read_at_most(stream, limit, self.child(name), "one of our records")

    def read_text(self, name: str, limit: int | None = None) -> str:
        return self.read_bytes(name, limit).decode()

    def read_json(self, name: str):
        """One of our JSON records (run.json, predict.json, ...), at most RECORD_BYTES."""
        try:
            return json.loads(self.read_text(name, RECORD_BYTES))
        except (OSError, ValueError) as exc:
            raise DigitsError(f"{self.child(name)}: unreadable: {first_line(exc)}") from None

    def write_bytes(self, name: str, data: bytes) -> None:
        """Readers see the old file or the whole new one: a rename locally, and a single
        object upload (atomic in object stores) otherwise."""
        if self.is_local:
            target = Path(self.path, name)
            # A name no one can guess, created only where nothing is (O_EXCL, which also
            # refuses a symbolic link, dangling or not): a file or link planted at a name
            # known in advance would otherwise be written through.
            staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
            descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                with os.fdopen(descriptor, "wb") as stream:
                    stream.write(data)
                os.replace(staging, target)
            except BaseException:
                staging.unlink(missing_ok=True)
                raise
        else:
            with self.fs.open_output_stream(f"{self.path}/{name}") as stream:
                stream.write(data)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    def write_json(self, name: str, record) -> None:
        """A record as JSON, every location in it without credentials."""
        self.write_text(name, without_credentials(json.dumps(record, indent=2)) + "\n")

    def open_output(self, name: str):
        """A stream writing a new file, for output too large to hold (the caller makes it
        appear whole: inside a staged folder, or before its completion record)."""
        return self.fs.open_output_stream(f"{self.path}/{name}")

    def delete(self, name: str) -> None:
        kind = self._type(name)
        if kind == pafs.FileType.Directory:
            self.fs.delete_dir(f"{self.path}/{name}")
        elif kind == pafs.FileType.File:
            self.fs.delete_file(f"{self.path}/{name}")


@dataclass(frozen=True)
class Output:
    """What a command writes into its output folder: how an earlier output of it is known, and
    what replacing one may touch."""

    command: str  # as messages name it: "digits predict"
    entries: tuple[str, ...]  # every name it writes there (and nothing else is replaced)
    record: str  # written last: the mark of a complete output
    underway: str | None = None  # the mark of an output being written or replaced


def require_output_folder(folder: Folder, advice: str, replaces: Output | None = None, force: bool = False) -> None:
    """An output folder must be new or empty, or an earlier output of the same command
    (`replaces`): one holding its record or underway mark and nothing the command does not
    write, which the caller replaces. `force` accepts any folder; only the entries the command
    writes are replaced in it (`staged_dir`), the rest is left alone."""
    if folder.exists() and not folder.is_folder():
        raise DigitsError(f"{folder}: exists and is not a folder")
    if folder.is_local:
        _require_writable(Path(folder.path), str(folder))
    names = folder.names()
    if force or not names:
        return
    if replaces is None:
        raise DigitsError(f"{folder}: not empty; {advice}")
    if not {replaces.record, replaces.underway} & set(names):
        raise DigitsError(f"{folder}: not empty and not an earlier `{replaces.command}` output; {advice}")
    foreign = [name for name in names if name not in replaces.entries]
    if foreign:
        raise DigitsError(f"{folder}: holds {foreign[0]!r}, which `{replaces.command}` does not write; {advice}")


def _require_writable(path: Path, named: str) -> None:
    """Checked before anything starts: where a folder would be made, writing must be allowed
    (by permissions and by the file system: even root cannot write to a read-only mount)."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise DigitsError(f"{named}: cannot write there: {existing} is on a read-only file system")
    if not os.access(existing, os.W_OK):
        raise DigitsError(f"{named}: cannot write there: {existing} is not writable")


@contextmanager
def writing_into(folder: Folder):
    """Where a new output folder's files are written: locally a staged folder that takes the
    folder's place once complete (`staged_dir`); on an object store, which cannot rename, the
    folder itself, into which the caller writes its completion record last."""
    if folder.is_local:
        with staged_dir(Path(folder.path)) as staging:
            yield Folder(str(staging))
    else:
        yield folder


@contextmanager
def staged_dir(target: Path, replaces: Output | None = None):
    """Yields an empty hidden folder beside `target` to write into. When the block succeeds,
    its entries take their place in target (`_put_in_place`); when it fails, it is deleted. A
    process killed midway leaves only a hidden `.NAME.partial-PID-*` folder, which the next run
    for the same target removes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(target)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        _put_in_place(staging, target, replaces)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone once renamed; else what it holds


def _put_in_place(staging: Path, target: Path, replaces: Output | None) -> None:
    """A new or empty target is replaced by the staging folder whole, in one rename. Otherwise
    (an earlier output of `replaces`, or any folder with --force) each staged entry replaces
    its namesake and the earlier output's other entries are removed, and nothing else in
    target is touched. Meanwhile the folder carries no record (the old one becomes the
    underway mark, if the output has one), so it never looks complete while it is mixed."""
    try:
        os.rename(staging, target)
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    staged = sorted(os.listdir(staging))
    for name in staged:  # all checked before anything changes
        if os.path.lexists(target / name) and _is_folder(target / name) != _is_folder(staging / name):
            raise DigitsError(
                f"{target / name}: {'a folder' if _is_folder(target / name) else 'a file'} "
                f"is in the way; nothing was replaced"
            )
    aside = staging / ".replaced"  # what is replaced goes here, to be deleted with staging
    aside.mkdir()
    if replaces:
        record, underway = target / replaces.record, replaces.underway
        if os.path.lexists(record):
            os.rename(record, target / underway if underway else aside / replaces.record)
        for name in replaces.entries:
            if name not in staged and name != underway and os.path.lexists(target / name):
                os.rename(target / name, aside / name)  # the earlier output's, not written now
    last = replaces.record if replaces else None
    for name in sorted(staged, key=lambda name: name == last):
        if _is_folder(target / name):
            os.rename(target / name, aside / name)
        os.replace(staging / name, target / name)  # a file or a link is replaced, not followed
    if replaces and replaces.underway and os.path.lexists(target / replaces.underway):
        os.unlink(target / replaces.underway)


def _is_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _remove_abandoned(target: Path) -> None:
    # The name escaped: a target named `a*` or `[x]` must match only its own leftovers.
    prefix = f".{target.name}.partial-"
    for leftover in target.parent.glob(glob.escape(prefix) + "*"):
        pid = leftover.name[len(prefix) :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
