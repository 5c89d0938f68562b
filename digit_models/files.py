"""Where files live: opening inputs, and output that appears complete or not at all.

Locations are local paths or URIs pyarrow can open (s3://, gs://, hdfs://, file://). On a
multi-node cluster the driver's local disk is not the workers', so outputs that every node must
reach go to a URI or a shared mount.

Completeness: a local output folder is assembled beside its final place and renamed into it
(`staged_dir`). Object stores have no rename, so a remote output folder is written in place
with its completion record (run.json, predict.json) last; readers check for that record.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from digit_models.errors import DigitsError, first_line


# The standard variables that tell S3 clients (pyarrow's among them) where the store is and who
# is asking. Processes that do not inherit the driver's environment need them handed over
# (ray_runtime.py).
AWS_ENVIRONMENT = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                   "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION")


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
    reached = (bucket, repr(sorted(settings.items())),
               tuple(os.environ.get(name) for name in AWS_ENVIRONMENT))
    if reached in _S3_BUCKETS_REACHED:
        return
    checking = pafs.S3FileSystem(**settings, retry_strategy=pafs.AwsStandardS3RetryStrategy(
        max_attempts=S3_CHECK_ATTEMPTS))
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

    def is_empty(self) -> bool:
        return not self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))

    def create(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def names(self) -> list[str]:
        """The names of the entries in this folder (none if it does not exist), sorted."""
        found = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted(info.base_name for info in found)

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(f"{self.path}/{name}") as stream:
            return stream.read()

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode()

    def read_json(self, name: str):
        try:
            return json.loads(self.read_text(name))
        except (OSError, ValueError) as exc:
            raise DigitsError(f"{self.child(name)}: unreadable: {first_line(exc)}") from None

    def write_bytes(self, name: str, data: bytes) -> None:
        """Readers see the old file or the whole new one: a rename locally, and a single
        object upload (atomic in object stores) otherwise."""
        if self.is_local:
            target = Path(self.path, name)
            staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            staging.write_bytes(data)
            os.replace(staging, target)
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


def require_output_folder(folder: Folder, advice: str,
                          replaces: tuple[str, tuple[str, ...]] | None = None) -> None:
    """An output folder must be new or empty, or be an earlier output of the same command
    (`replaces`: the command, and the files that mark its output), which the caller replaces."""
    if folder.exists() and not folder.is_folder():
        raise DigitsError(f"{folder}: exists and is not a folder")
    if folder.is_local:
        _require_writable(Path(folder.path), str(folder))
    if folder.is_empty():
        return
    if replaces is None:
        raise DigitsError(f"{folder}: not empty; {advice}")
    command, markers = replaces
    if not any(folder.exists(marker) for marker in markers):
        raise DigitsError(f"{folder}: not empty and not an earlier `{command}` output; {advice}")


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
def staged_dir(target: Path):
    """Yields an empty hidden folder beside `target` to write into. When the block succeeds
    the folder takes target's name (replacing a previous output there); when it fails it is
    deleted. A process killed midway leaves only a hidden `.NAME.partial-PID-*` folder, which
    the next run for the same target removes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(target)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        previous = target.parent / f".{target.name}.replaced-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(target, previous)
        os.rename(staging, target)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        os.rename(staging, target)


def _remove_abandoned(target: Path) -> None:
    for leftover in target.parent.glob(f".{target.name}.partial-*"):
        pid = leftover.name.rsplit(".partial-", 1)[1].split("-")[0]
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
