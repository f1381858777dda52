"""API keys: the hashed keys file, its atomic writes, and authentication.

The file never holds a key, only its SHA-256 (keys are 256-bit random, so a
plain hash cannot be brute-forced). Writes go to a temp file in the same
directory, are fsynced and renamed over the old file, mode 0600, under an
exclusive lock so two `keys` commands cannot lose each other's change.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import orjson
from limits import parse as parse_limit

from .errors import GatewayError

KEY_PREFIX = "er-"


class KeysFileError(Exception):
    """The keys file exists but cannot be used; the gateway must not start on it."""


class KeyExists(ValueError):
    """A key of that name exists already (create)."""


class NoSuchKey(ValueError):
    """No key of that name (revoke, rotate)."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    hash: str
    created: str
    hint: str = ""  # first characters of the key, to tell keys apart in `keys list`
    rate_limit: str | None = None  # e.g. "100/minute"; None = the gateway default
    token_limit: str | None = None
    models: tuple[str, ...] | None = None  # None = every model
    expires: str | None = None  # ISO date or datetime (UTC)
    revoked: bool = False
    admin: bool = False
    _expires_ts: float | None = field(default=None, compare=False, repr=False)

    def expired(self, now: float) -> bool:
        return self._expires_ts is not None and now >= self._expires_ts

    def public(self, now: float) -> dict[str, Any]:
        """What `keys list` and GET /admin/keys show: never the hash."""
        state = "revoked" if self.revoked else "expired" if self.expired(now) else "active"
        d = self.to_json()
        del d["hash"], d["revoked"]
        return {**d, "state": state}

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("_expires_ts")
        d["models"] = list(self.models) if self.models is not None else None
        return d


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def expiry_timestamp(value: str) -> float:
    """A date means 'valid through that day (UTC)'; a datetime is taken as given."""
    try:
        if len(value) == 10:
            day = dt.date.fromisoformat(value)
            end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC)
            return end.timestamp()
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"expiry {value!r} is not YYYY-MM-DD or an ISO datetime") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def _record(raw: dict[str, Any]) -> ApiKey:
    models = raw.get("models")
    expires = raw.get("expires")
    for spec in (raw.get("rate_limit"), raw.get("token_limit")):
        if spec is not None:
            parse_limit(spec)
    return ApiKey(
        name=str(raw["name"]),
        hash=str(raw["hash"]),
        created=str(raw.get("created", "")),
        hint=str(raw.get("hint", "")),
        rate_limit=raw.get("rate_limit"),
        token_limit=raw.get("token_limit"),
        models=tuple(models) if models is not None else None,
        expires=expires,
        revoked=bool(raw.get("revoked", False)),
        admin=bool(raw.get("admin", False)),
        _expires_ts=expiry_timestamp(expires) if expires else None,
    )


def read_keys(path: str | os.PathLike[str]) -> list[ApiKey]:
    """Parse the keys file; any problem is a KeysFileError with a clear message."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise KeysFileError(f"cannot read keys file {path}: {e.strerror}") from None
    try:
        data = orjson.loads(raw)
        items = data["keys"]
        if not isinstance(items, list):
            raise TypeError("'keys' is not a list")
        keys = [_record(item) for item in items]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise KeysFileError(
            f"keys file {path} is corrupt ({type(e).__name__}: {e}); fix or move it away — it was left untouched"
        ) from None
    names = [k.name for k in keys]
    if len(names) != len(set(names)):
        raise KeysFileError(f"keys file {path} has two keys with the same name")
    return keys


def write_keys(path: str | os.PathLike[str], keys: list[ApiKey]) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    body = orjson.dumps({"version": 1, "keys": [k.to_json() for k in keys]}, option=orjson.OPT_INDENT_2)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(body + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def locked(path: str | os.PathLike[str]) -> Iterator[None]:
    """Serialise read-modify-write cycles of the keys file across processes."""
    lock_path = Path(str(path) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def new_record(
    name: str,
    key: str,
    *,
    rate_limit: str | None = None,
    token_limit: str | None = None,
    models: list[str] | None = None,
    expires: str | None = None,
    admin: bool = False,
) -> ApiKey:
    return _record(
        {
            "name": name,
            "hash": hash_key(key),
            "hint": key[: len(KEY_PREFIX) + 4],
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "rate_limit": rate_limit,
            "token_limit": token_limit,
            "models": models,
            "expires": expires,
            "admin": admin,
        }
    )


class FileStore:
    """The keys file as the `keys` commands change it (a lock serialises read-modify-write)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def read(self) -> list[ApiKey]:
        return read_keys(self.path)

    def update(self, change: Callable[[list[ApiKey]], list[ApiKey]]) -> None:
        with locked(self.path):
            write_keys(self.path, change(_read_or_empty(self.path)))

    def ensure_default(self) -> str | None:
        """On first start create the file with one admin key and return that key; else None."""
        with locked(self.path):
            if self.path.exists():
                read_keys(self.path)  # refuse to start on a corrupt file, never overwrite it
                return None
            key = generate_key()
            write_keys(self.path, [new_record("default", key, admin=True)])
            return key


class Store(Protocol):
    """Where the `keys` commands keep keys: the file (FileStore) or Redis (keys_redis.RedisStore)."""

    def read(self) -> list[ApiKey]: ...

    def update(self, change: Callable[[list[ApiKey]], list[ApiKey]]) -> None:
        """Replace the keys with `change(keys)` atomically (`change` may raise to change nothing)."""
        ...

    def ensure_default(self) -> str | None: ...


def _store(where: Store | str | os.PathLike[str]) -> Store:
    return FileStore(where) if isinstance(where, (str, os.PathLike)) else where


def create_key(where: Store | str | os.PathLike[str], name: str, **options: Any) -> str:
    """Add a key named `name`; return the key (the only time it exists in clear)."""
    key = generate_key()

    def change(keys: list[ApiKey]) -> list[ApiKey]:
        if any(k.name == name for k in keys):
            raise KeyExists(f"a key named {name!r} already exists (use `keys rotate {name}`)")
        return [*keys, new_record(name, key, **options)]

    _store(where).update(change)
    return key


def revoke_key(where: Store | str | os.PathLike[str], name: str) -> None:
    def change(keys: list[ApiKey]) -> list[ApiKey]:
        _find(keys, name)
        return [replace(k, revoked=True) if k.name == name else k for k in keys]

    _store(where).update(change)


def rotate_key(where: Store | str | os.PathLike[str], name: str) -> str:
    """Replace the key of `name` (same limits), un-revoking it; return the new key."""
    key = generate_key()

    def change(keys: list[ApiKey]) -> list[ApiKey]:
        _find(keys, name)
        return [
            replace(k, hash=hash_key(key), hint=key[: len(KEY_PREFIX) + 4], revoked=False) if k.name == name else k
            for k in keys
        ]

    _store(where).update(change)
    return key


def import_keys(target: Store, records: list[ApiKey]) -> tuple[list[str], list[str]]:
    """Add `records` (hashes as they are) to `target`; names already there are skipped.
    Returns (added, skipped) names."""
    added: list[str] = []
    skipped: list[str] = []

    def change(keys: list[ApiKey]) -> list[ApiKey]:
        added.clear()
        skipped.clear()
        have = {k.name for k in keys}
        for r in records:
            (skipped if r.name in have else added).append(r.name)
        return [*keys, *(r for r in records if r.name not in have)]

    target.update(change)
    return added, skipped


def _read_or_empty(path: str | os.PathLike[str]) -> list[ApiKey]:
    try:
        return read_keys(path)
    except FileNotFoundError:
        return []


def _find(keys: list[ApiKey], name: str) -> ApiKey:
    for k in keys:
        if k.name == name:
            return k
    raise NoSuchKey(f"no key named {name!r}")


class Keys:
    """The keys a running gateway accepts: one dict, swapped whole when the store changes.
    `loaded` is False until the store was read once (Redis unreachable at start)."""

    loaded = True

    def __init__(self) -> None:
        self._by_hash: dict[str, ApiKey] = {}

    def use(self, keys: list[ApiKey]) -> None:
        self._by_hash = {k.hash: k for k in keys}
        self.loaded = True

    def authenticate(self, key: str | None) -> ApiKey:
        if not key:
            raise GatewayError(
                401,
                "missing API key: send 'Authorization: Bearer KEY' or '?api_key=KEY'",
                type="authentication_error",
            )
        record = self._by_hash.get(hash_key(key))
        if record is None:
            if not self.loaded:
                raise GatewayError(
                    503, "API keys are not loaded yet (the key store is unreachable)", headers={"Retry-After": "1"}
                )
            raise GatewayError(401, "invalid API key", type="authentication_error")
        if record.revoked:
            raise GatewayError(401, f"API key {record.name!r} has been revoked", type="authentication_error")
        if record.expired(time.time()):
            raise GatewayError(401, f"API key {record.name!r} expired on {record.expires}", type="authentication_error")
        return record


class KeyStore(Keys):
    """The keys file a running gateway reads (`--keys-store file`), re-read when it changes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self.reload()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def reload(self) -> int:
        """Re-read the file (raises KeysFileError/FileNotFoundError, keeping the old keys)."""
        stamp = self._file_stamp()
        keys = read_keys(self.path)
        self.use(keys)
        self._stamp = stamp
        return len(keys)

    def changed(self) -> bool:
        return self._file_stamp() != self._stamp
