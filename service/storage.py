"""Object storage behind one small interface: a local directory or an S3 bucket (via boto3).

Keys are '/'-separated paths such as ``jobs/<id>/images/scratch/0.png``. Writes are whole-object
and idempotent: writing a key again replaces it, so a redelivered job overwrites its outputs.
Listings are in key order (S3's: by code point), so a page can start after the last key of the last.

Download URLs: on S3, presigned against S3_PUBLIC_ENDPOINT_URL when it is set (the address callers
reach, e.g. the port compose publishes MinIO on); against AWS itself when the endpoint is AWS's;
and none behind any other (private) endpoint, so the API streams those downloads itself.
"""

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

CHUNK = 1 << 20


class StorageError(RuntimeError):
    pass


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int


def check_key(key: str) -> str:
    """Reject keys that could escape the storage root ('..', absolute, empty parts)."""
    if not key or "\\" in key or any(part in ("", ".", "..") for part in key.split("/")):
        raise StorageError(f"invalid storage key {key!r}")
    return key


class Storage(Protocol):
    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...
    def put_file(self, key: str, path: Path) -> None: ...
    def get(self, key: str) -> bytes: ...
    def get_file(self, key: str, path: Path) -> None: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str, start_after: str | None = None, limit: int | None = None) -> list[StoredObject]: ...
    def stream(self, key: str) -> Iterator[bytes]: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def presigned_url(self, key: str, expires: int) -> str | None: ...
    def check(self) -> None: ...


class LocalStorage:
    """A directory on disk. Downloads go through the API (no presigned URLs)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key, data, content_type="application/octet-stream"):
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a reader never sees half a file and a killed worker leaves none.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def put_file(self, key, path):
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        os.close(fd)
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)

    def get(self, key):
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    def get_file(self, key, path):
        try:
            shutil.copyfile(self._path(key), path)
        except FileNotFoundError:
            raise KeyError(key) from None

    def exists(self, key):
        return self._path(key).is_file()

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def list(self, prefix, start_after=None, limit=None):
        base = self.root / prefix
        if not base.is_dir():
            return []
        found = []
        for path in base.rglob("*"):
            key = path.relative_to(self.root).as_posix()
            if path.is_file() and not path.name.startswith(".tmp-") and (start_after is None or key > start_after):
                found.append(StoredObject(key, path.stat().st_size))
        found.sort(key=lambda o: o.key)  # by key, as S3 lists, not by path parts
        return found if limit is None else found[:limit]

    def stream(self, key):
        try:
            with open(self._path(key), "rb") as f:
                while chunk := f.read(CHUNK):
                    yield chunk
        except FileNotFoundError:
            raise KeyError(key) from None

    def delete_prefix(self, prefix):
        for obj in self.list(prefix):
            self._path(obj.key).unlink(missing_ok=True)

    def presigned_url(self, key, expires):
        return None

    def check(self):
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"storage directory {self.root} is not writable")


class S3Storage:
    """An S3 bucket and prefix. Endpoint and credentials come from boto3's standard settings
    (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...);
    `public_endpoint` is where callers reach the same S3, for presigned URLs."""

    def __init__(self, bucket: str, prefix: str = "", public_endpoint: str | None = None):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        config = Config(retries={"max_attempts": 5, "mode": "standard"}, s3={"addressing_style": "path"})
        self.client = boto3.client("s3", config=config)
        # A presigned URL signs its host: sign with a client of the address the caller will use.
        if public_endpoint:
            self.presigner = boto3.client("s3", config=config, endpoint_url=public_endpoint)
        elif (urlparse(self.client.meta.endpoint_url).hostname or "").endswith(".amazonaws.com"):
            self.presigner = self.client
        else:
            self.presigner = None

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def put(self, key, data, content_type="application/octet-stream"):
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type)

    def put_file(self, key, path):
        self.client.upload_file(str(path), self.bucket, self._key(key))  # multipart for big files

    def get(self, key):
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            raise KeyError(key) from None

    def get_file(self, key, path):
        if not self.exists(key):
            raise KeyError(key)
        self.client.download_file(self.bucket, self._key(key), str(path))

    def exists(self, key):
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def list(self, prefix, start_after=None, limit=None):
        found = []
        paginator = self.client.get_paginator("list_objects_v2")
        options = {"StartAfter": self.prefix + start_after} if start_after else {}
        pages = paginator.paginate(
            Bucket=self.bucket, Prefix=self.prefix + prefix, PaginationConfig={"MaxItems": limit}, **options
        )
        for page in pages:
            for item in page.get("Contents", []):
                found.append(StoredObject(item["Key"][len(self.prefix) :], item["Size"]))
        found.sort(key=lambda o: o.key)
        return found if limit is None else found[:limit]

    def stream(self, key):
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except self.client.exceptions.NoSuchKey:
            raise KeyError(key) from None
        yield from body.iter_chunks(CHUNK)

    def delete_prefix(self, prefix):
        keys = [{"Key": self.prefix + o.key} for o in self.list(prefix)]
        for start in range(0, len(keys), 1000):
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys[start : start + 1000]})

    def presigned_url(self, key, expires):
        if self.presigner is None:
            return None
        return self.presigner.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=expires
        )

    def check(self):
        self.client.head_bucket(Bucket=self.bucket)


def open_storage(url: str, public_endpoint: str | None = None) -> Storage:
    """`file:///abs/dir` or `s3://bucket/prefix`; `public_endpoint`: S3_PUBLIC_ENDPOINT_URL."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStorage(parsed.path)
    if parsed.scheme == "s3" and parsed.netloc:
        return S3Storage(parsed.netloc, parsed.path, public_endpoint)
    raise StorageError(f"unsupported STORAGE_URL {url!r}: use file:///abs/dir or s3://bucket/prefix")
