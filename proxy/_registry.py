"""Peer discovery: who is in a group, at which address, and the group's signing key.

Each member keeps a lease in the registry: an entry that expires on the registry's own clock unless it is
refreshed, so a peer killed with SIGKILL drops out of everyone's view with nobody cleaning up after it.

`RedisRegistry` is the real one (any Redis, or the embedded server `rallypoint registry` runs);
`InMemoryRegistry` is the same contract inside one process, for tests. Both are thread-safe. Key layout
in Redis, with `ns` the namespace (default ``rallypoint``) and `group` the group name::

    {ns}:{group}:peer:{name}   one member's PeerRecord as JSON, with a PX lease
    {ns}:{group}:members       set of member names (an index; stale names are dropped lazily)
    {ns}:{group}:version       a counter bumped whenever the member list changes (see `members_version`)
    {ns}:{group}:key           the group's random 32-byte HMAC key, created by the first member, with a
                               TTL (`GROUP_KEY_TTL`) that live members renew (`renew_group_key`)
    {ns}:{group}:stats:{name}  a short summary of one member's counters (`publish_stats`), with a PX TTL
                               that outlives its lease, so watchers can tell who left or went
    {ns}:{group}:stats         set of the names with a summary (an index, with a TTL; stale names dropped lazily)

The group key is only used by groups that run without a secret: with one, the key is derived from it
(`_trust.py`) and never written here, and each record carries a `signature` made with that key.

Every call is bounded: each attempt by the socket connect and read timeouts, and a connection error is
retried once, at once (a pooled connection gone stale across a Redis restart); a timeout is not retried.
Every Redis failure surfaces as `RegistryError` naming the registry URL without its password.

    >>> reg = InMemoryRegistry()
    >>> reg.register("g", PeerRecord.new("worker_1", "worker", "tcp://127.0.0.1:5555"), ttl=3.0)
    >>> sorted(reg.members("g"))
    ['worker_1']
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from rallypoint.errors import ConfigError, RegistryError

__all__ = [
    "DEFAULT_URL",
    "GROUP_KEY_BYTES",
    "GROUP_KEY_TTL",
    "InMemoryRegistry",
    "PeerRecord",
    "RedisRegistry",
    "Registry",
    "redact_url",
    "registry_from",
]

logger = logging.getLogger(__name__)

DEFAULT_URL = "redis://localhost:6379/0"
GROUP_KEY_BYTES = 32
# Seconds a group key outlives the last renewal: a group whose members are all gone (or cannot reach the
# registry) this long loses its key, and the next member to join creates a new one. Renew it far more often.
GROUP_KEY_TTL = 60.0

_REDACTED = "***"


# --------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class PeerRecord:
    """What a member publishes about itself: how to reach it and which run of it this is.

    `incarnation` is random per process start, so a peer that restarts under the same name is told
    apart from its previous life. `started_at` is wall-clock (`time.time()`), for humans only.
    `signature` (hex) is empty unless the group runs with a secret; then it is `_trust.sign_record`'s MAC
    over every other field, and records without a valid one are not taken. Older records without the
    field parse as unsigned.

        >>> rec = PeerRecord.new("master", "master", "tcp://127.0.0.1:40123")
        >>> PeerRecord.from_json(rec.to_json()) == rec
        True
    """

    name: str
    component_type: str
    address: str
    incarnation: str
    pid: int
    host: str
    started_at: float
    signature: str = ""

    def __post_init__(self) -> None:
        problem = _record_problem(asdict(self))
        if problem:
            raise ConfigError(f"invalid PeerRecord: {problem}")

    @classmethod
    def new(cls, name: str, component_type: str, address: str) -> PeerRecord:
        """A record for this process, with a fresh incarnation id."""
        return cls(
            name=name,
            component_type=component_type,
            address=address,
            incarnation=secrets.token_hex(8),
            pid=os.getpid(),
            host=socket.gethostname(),
            started_at=time.time(),
        )

    def to_json(self) -> str:
        """Compact JSON text of the record."""
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, data: str | bytes) -> PeerRecord:
        """Parse and validate a registry entry; anything malformed raises `RegistryError`.

        Unknown extra fields are ignored, so a newer rallypoint can add fields without breaking older peers.
        """
        try:
            obj = json.loads(data)
        except (ValueError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
            raise RegistryError(f"malformed peer record: not JSON ({exc})") from exc
        if not isinstance(obj, dict):
            raise RegistryError(f"malformed peer record: expected a JSON object, got {type(obj).__name__}")
        problem = _record_problem(obj)
        if problem:
            raise RegistryError(f"malformed peer record: {problem}")
        return cls(**{f.name: obj[f.name] for f in fields(cls) if f.name in obj})  # absent: the default


_STR_FIELDS = ("name", "component_type", "address", "incarnation", "host")


def _record_problem(obj: Mapping[str, Any]) -> str | None:
    """Why `obj` is not a valid record, or None. Shared by the constructor and `from_json`."""
    for name in _STR_FIELDS:
        if name not in obj:
            return f"missing field {name!r}"
        if not isinstance(obj[name], str):
            return f"field {name!r} must be a string, not {type(obj[name]).__name__}"
    for name in ("name", "address", "incarnation"):
        if not obj[name]:
            return f"field {name!r} must not be empty"
    pid, started = obj.get("pid"), obj.get("started_at")
    if "pid" not in obj:
        return "missing field 'pid'"
    if isinstance(pid, bool) or not isinstance(pid, int):  # bool is an int subclass
        return f"field 'pid' must be an integer, not {type(pid).__name__}"
    if "started_at" not in obj:
        return "missing field 'started_at'"
    if isinstance(started, bool) or not isinstance(started, (int, float)) or not math.isfinite(started):
        return f"field 'started_at' must be a finite number, not {started!r}"
    signature = obj.get("signature", "")  # optional: records of older versions have none
    if not isinstance(signature, str):
        return f"field 'signature' must be a string, not {type(signature).__name__}"
    if signature.strip(_HEX_DIGITS):
        return "field 'signature' must be lowercase hex"
    return None


_HEX_DIGITS = "0123456789abcdef"


# ------------------------------------------------------------------------------------------- protocol


@runtime_checkable
class Registry(Protocol):
    """Where group members find each other. Every method is bounded in time and raises `RegistryError`."""

    def register(self, group: str, record: PeerRecord, ttl: float) -> None:
        """Publish `record` under `group` with a lease of `ttl` seconds, replacing one of the same name."""
        ...

    def refresh(self, group: str, record: PeerRecord, ttl: float) -> bool:
        """Renew the lease; False if the entry had expired or vanished and was re-created."""
        ...

    def unregister(self, group: str, name: str) -> None:
        """Remove a member's entry (no error if it is already gone)."""
        ...

    def members(self, group: str) -> dict[str, PeerRecord]:
        """The live members by name; malformed entries are logged, counted and skipped."""
        ...

    def group_key(self, group: str, *, create: bool = True, ttl: float = GROUP_KEY_TTL) -> bytes:
        """The group's HMAC key, created atomically by the first caller when `create` is true.

        With `create`, the key (new or not) lives `ttl` seconds from now; without, it is only read.
        """
        ...

    def ensure_group_key(self, group: str, key: bytes, *, ttl: float = GROUP_KEY_TTL) -> bytes:
        """Put back a known key if the registry lost it (restart); returns the key the registry now holds,
        which lives `ttl` seconds from now."""
        ...

    def renew_group_key(self, group: str, ttl: float = GROUP_KEY_TTL) -> bool:
        """Let the group's key live `ttl` seconds from now (one round trip); False if there is none."""
        ...

    def members_version(self, group: str) -> int:
        """A number that changes whenever the member list does (a member registered, re-registered, left, or
        was found expired): one cheap read tells a member whether the whole list is worth reading again."""
        ...

    def close(self) -> None:
        """Release connections; idempotent."""
        ...

    def publish_stats(self, group: str, name: str, data: bytes, ttl: float) -> None:
        """Store `data` (a member's summary, opaque here) as `name`'s stats for `ttl` seconds: one round trip."""
        ...

    def read_stats(self, group: str) -> dict[str, bytes]:
        """Every summary of `group` that has not expired, by member name (members or not)."""
        ...

    def lease_left(self, group: str) -> dict[str, float]:
        """Seconds left on the lease of each listed member (members whose lease lapsed are left out)."""
        ...


# ------------------------------------------------------------------------------------------- helpers


def _check_group(group: str) -> None:
    # ':' separates key segments: a group "g:peer" would collide with member keys of group "g".
    if not isinstance(group, str) or not group or ":" in group:
        raise ConfigError(f"group name must be a non-empty string without ':', not {group!r}")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"member name must be a non-empty string, not {name!r}")


def _ttl_ms(ttl: float) -> int:
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl) or ttl <= 0:
        raise ConfigError(f"ttl must be a positive number of seconds, not {ttl!r}")
    return max(1, round(ttl * 1000))


def _check_key(key: bytes, *, where: str) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) != GROUP_KEY_BYTES:
        raise RegistryError(f"group key in {where} is not {GROUP_KEY_BYTES} bytes; refusing to use it")
    return bytes(key)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def redact_url(url: str) -> str:
    """`url` with any password (user-info or ``?password=`` query) replaced by ``***``.

    >>> redact_url("redis://alice:s3cret@host:6379/0")
    'redis://alice:***@host:6379/0'
    """
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user, sep, _password = userinfo.partition(":")
            netloc = f"{user}{':' + _REDACTED if sep else ''}@{hostport}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, _REDACTED if "password" in k.lower() else v) for k, v in pairs], safe="*")
        rebuilt = urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
        if not netloc and url.startswith(f"{parts.scheme}://"):  # unix:///path loses its "//" otherwise
            rebuilt = f"{parts.scheme}://{rebuilt[len(parts.scheme) + 1 :]}"
        return rebuilt
    except ValueError:
        return "<unparseable registry URL>"


def _url_secrets(url: str) -> list[str]:
    """The secret strings in `url`, to scrub from any message that might echo them."""
    try:
        parts = urlsplit(url)
        found = [parts.password] if parts.password else []
        found += [v for k, v in parse_qsl(parts.query) if "password" in k.lower() and v]
        return found
    except ValueError:
        return []


# --------------------------------------------------------------------------------------------- Redis


def _driver_info() -> dict[str, Any]:
    """What redis-py reports of itself to the server (CLIENT SETINFO), given rather than looked up.

    Left to itself, a redis-py with `DriverInfo` looks its own version up in the installed packages'
    metadata for every new connection (~6 ms for the first, inside every process's Proxy constructor); the
    same version read from `redis.__version__` costs nothing. Older redis-py looks it up once, at import,
    and takes no `driver_info`.
    """
    driver_info = getattr(redis, "DriverInfo", None)
    return {} if driver_info is None else {"driver_info": driver_info(lib_version=redis.__version__)}


class RedisRegistry:
    """The registry on a Redis server (or anything speaking its protocol, like the embedded one).

    `url` is a redis-py URL: ``redis://[[user]:[password]@]host[:port][/db]``, ``rediss://`` for TLS,
    ``unix:///path.sock``. `timeout` bounds connecting and each reply, in seconds. `client` injects a
    ready client (for example ``fakeredis.FakeRedis()``) instead; `url` then only names it in messages.
    `namespace` prefixes every key, so several deployments can share one Redis database.

        >>> reg = RedisRegistry("redis://:s3cret@localhost:6379/0", timeout=2.0)   # connects lazily
        >>> reg.redacted_url
        'redis://:***@localhost:6379/0'
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        timeout: float = 2.0,
        namespace: str = "rallypoint",
        client: redis.Redis | None = None,
    ) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ConfigError(f"registry timeout must be a positive number of seconds, not {timeout!r}")
        if not namespace or not isinstance(namespace, str):
            raise ConfigError(f"registry namespace must be a non-empty string, not {namespace!r}")
        self._secrets = _url_secrets(url)
        self.redacted_url = redact_url(url)
        self.namespace = namespace
        self.timeout = float(timeout)
        self.malformed = 0  # entries skipped because they did not parse
        self._count_lock = threading.Lock()
        self._closed = False
        self._client = client if client is not None else self._connect(url)
        kwargs = self._client.connection_pool.connection_kwargs
        # Where the registry lives: the proxy binds on the interface that reaches it (None: a unix socket).
        self.host: str | None = kwargs.get("host") if "path" not in kwargs else None
        self.port: int | None = kwargs.get("port") if self.host is not None else None

    def _connect(self, url: str) -> redis.Redis:
        try:
            return redis.Redis.from_url(
                url,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                # redis-py 6+ retries 10 times with backoff by default, which would stretch a dead registry
                # into many seconds. One immediate retry on connection errors covers a pooled connection
                # that went stale across a Redis restart; timeouts are not retried, keeping calls bounded.
                retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
                # RESP2: works with every Redis version (HELLO needs 6+) and needs no push-message handling.
                protocol=2,
                **_driver_info(),
            )
        except (ValueError, TypeError, redis.RedisError) as exc:
            raise ConfigError(f"bad registry URL {self.redacted_url}: {self._scrub(str(exc))}") from exc

    # -- keys

    def _peer_key(self, group: str, name: str) -> str:
        return f"{self.namespace}:{group}:peer:{name}"

    def _version_key(self, group: str) -> str:
        return f"{self.namespace}:{group}:version"

    def _members_key(self, group: str) -> str:
        return f"{self.namespace}:{group}:members"

    def _group_key_key(self, group: str) -> str:
        return f"{self.namespace}:{group}:key"

    def _stats_key(self, group: str, name: str) -> str:
        return f"{self.namespace}:{group}:stats:{name}"

    def _stats_index_key(self, group: str) -> str:
        return f"{self.namespace}:{group}:stats"

    # -- plumbing

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, _REDACTED)
        return text

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn every redis-py failure into RegistryError; the message names the URL, never a password."""
        if self._closed:
            raise RegistryError(f"registry {self.redacted_url} is closed")
        try:
            yield
        except redis.RedisError as exc:
            detail = self._scrub(str(exc)) or type(exc).__name__
            raise RegistryError(
                f"registry {self.redacted_url}: {action} failed: {type(exc).__name__}: {detail}"
            ) from exc

    # -- protocol

    def register(self, group: str, record: PeerRecord, ttl: float) -> None:
        """Publish `record` with a lease of `ttl` seconds, replacing any entry of the same name."""
        _check_group(group)
        px = _ttl_ms(ttl)
        with self._errors(f"register {record.name!r} in group {group!r}"):
            pipe = self._client.pipeline(transaction=True)
            pipe.set(self._peer_key(group, record.name), record.to_json(), px=px)
            pipe.sadd(self._members_key(group), record.name)
            pipe.incr(self._version_key(group))
            pipe.execute()

    def refresh(self, group: str, record: PeerRecord, ttl: float) -> bool:
        """Renew the lease (and rewrite the record); False if it had lapsed and was re-created."""
        _check_group(group)
        px = _ttl_ms(ttl)
        with self._errors(f"refresh {record.name!r} in group {group!r}"):
            pipe = self._client.pipeline(transaction=True)
            pipe.set(self._peer_key(group, record.name), record.to_json(), px=px, xx=True)
            # Re-adding the name each time heals the index if a concurrent lazy cleanup dropped it.
            pipe.sadd(self._members_key(group), record.name)
            existed, _ = pipe.execute()
            if existed:
                return True
        logger.info("registry lease of %r in group %r had lapsed; registering again", record.name, group)
        self.register(group, record, ttl)
        return False

    def unregister(self, group: str, name: str) -> None:
        """Delete a member's entry and its index name; a no-op if it is gone already."""
        _check_group(group)
        _check_name(name)
        with self._errors(f"unregister {name!r} from group {group!r}"):
            pipe = self._client.pipeline(transaction=True)
            pipe.delete(self._peer_key(group, name))
            pipe.srem(self._members_key(group), name)
            pipe.incr(self._version_key(group))
            pipe.execute()

    def members(self, group: str) -> dict[str, PeerRecord]:
        """Live members by name: SMEMBERS, then MGET of their entries (two round trips)."""
        _check_group(group)
        with self._errors(f"list members of group {group!r}"):
            raw_names = self._client.smembers(self._members_key(group))
            names = sorted(
                n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in raw_names
            )
            values = self._client.mget([self._peer_key(group, n) for n in names]) if names else []
        live: dict[str, PeerRecord] = {}
        expired: list[str] = []
        for name, value in zip(names, values, strict=True):
            if value is None:
                expired.append(name)
                continue
            record = self._parse(group, name, value)
            if record is not None:
                live[name] = record
        if expired:
            self._drop_expired(group, expired)
        return live

    def _parse(self, group: str, name: str, value: bytes | str) -> PeerRecord | None:
        try:
            record = PeerRecord.from_json(value)
        except RegistryError as exc:
            self._count_malformed()
            logger.warning(
                "registry %s: skipping entry %r of group %r: %s", self.redacted_url, name, group, exc
            )
            return None
        if record.name != name:
            self._count_malformed()
            logger.warning(
                "registry %s: skipping entry %r of group %r: it names itself %r",
                self.redacted_url,
                name,
                group,
                record.name,
            )
            return None
        return record

    def _count_malformed(self) -> None:
        with self._count_lock:
            self.malformed += 1

    def _drop_expired(self, group: str, names: list[str]) -> None:
        """Remove index names whose lease expired, unless the member re-registered meanwhile.

        WATCH makes the removal conditional: if any of those entries is written between our check and the
        SREM (a peer restarting under the same name), the transaction aborts and the name stays.
        """
        keys = [self._peer_key(group, n) for n in names]
        try:
            with self._errors(f"clean up expired members of group {group!r}"):
                with self._client.pipeline(transaction=True) as pipe:
                    pipe.watch(*keys)  # type: ignore[no-untyped-call]  # untyped in redis-py
                    still_gone = [n for n, v in zip(names, pipe.mget(keys), strict=True) if v is None]
                    if not still_gone:
                        return
                    pipe.multi()
                    pipe.srem(self._members_key(group), *still_gone)
                    pipe.incr(self._version_key(group))  # every member re-reads the list: a lease lapsed
                    pipe.execute()
        except RegistryError as exc:
            # Best effort: the index is only a hint; the next members() call tries again.
            if not isinstance(exc.__cause__, redis.WatchError):
                logger.debug("%s", exc)

    def group_key(self, group: str, *, create: bool = True, ttl: float = GROUP_KEY_TTL) -> bytes:
        """The group's key; with `create`, the first caller's random key wins (SET NX PX, PEXPIRE, GET in
        one transaction: the key lives `ttl` seconds from now, whoever made it)."""
        _check_group(group)
        name = self._group_key_key(group)
        px = _ttl_ms(ttl)
        with self._errors(f"get the key of group {group!r}"):
            if create:
                pipe = self._client.pipeline(transaction=True)
                pipe.set(name, secrets.token_bytes(GROUP_KEY_BYTES), nx=True, px=px)
                pipe.pexpire(name, px)
                pipe.get(name)
                created, _, key = pipe.execute()
                if created:
                    logger.info("created the key of group %r in registry %s", group, self.redacted_url)
            else:
                key = self._client.get(name)
        if key is None:
            raise RegistryError(f"registry {self.redacted_url} holds no key for group {group!r}")
        return _check_key(key, where=f"registry {self.redacted_url}, group {group!r}")

    def ensure_group_key(self, group: str, key: bytes, *, ttl: float = GROUP_KEY_TTL) -> bytes:
        """Store `key` unless the registry has one (SET NX PX); returns the key it holds afterwards, which
        lives `ttl` seconds from now (PEXPIRE; one transaction, one round trip)."""
        _check_group(group)
        key = _check_key(key, where="the argument")
        name = self._group_key_key(group)
        px = _ttl_ms(ttl)
        with self._errors(f"restore the key of group {group!r}"):
            pipe = self._client.pipeline(transaction=True)
            pipe.set(name, key, nx=True, px=px)
            pipe.pexpire(name, px)
            pipe.get(name)
            restored, _, held = pipe.execute()
        if restored:
            logger.warning("registry %s had lost the key of group %r; restored it", self.redacted_url, group)
        if held is None:  # deleted between SET and GET inside MULTI: impossible, but never return None
            raise RegistryError(f"registry {self.redacted_url} holds no key for group {group!r}")
        return _check_key(held, where=f"registry {self.redacted_url}, group {group!r}")

    def renew_group_key(self, group: str, ttl: float = GROUP_KEY_TTL) -> bool:
        """PEXPIRE the group's key `ttl` seconds from now: one round trip; False if the key is gone (expired or
        lost with a registry restart), for the caller to put it back with `ensure_group_key`."""
        _check_group(group)
        px = _ttl_ms(ttl)
        with self._errors(f"renew the key of group {group!r}"):
            return bool(self._client.pexpire(self._group_key_key(group), px))

    def members_version(self, group: str) -> int:
        """The group's member-list version: one GET (0 before anyone registered)."""
        _check_group(group)
        with self._errors(f"read the member-list version of group {group!r}"):
            value = self._client.get(self._version_key(group))
        try:
            return int(value) if value is not None else 0
        except (TypeError, ValueError) as exc:
            raise RegistryError(f"registry {self.redacted_url}: the member-list version of group {group!r} "
                                f"is not a number: {value!r:.40}") from exc

    def close(self) -> None:
        """Close the connection pool; later calls raise RegistryError. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._client.close()
        except redis.RedisError as exc:  # closing must not fail the caller
            logger.debug("registry %s: error while closing: %s", self.redacted_url, self._scrub(str(exc)))

    def publish_stats(self, group: str, name: str, data: bytes, ttl: float) -> None:
        """SET the summary with PX `ttl`, SADD its name to the index and let the index live twice as long (one
        transaction, one round trip)."""
        _check_group(group)
        _check_name(name)
        px = _ttl_ms(ttl)
        with self._errors(f"publish the stats of {name!r} in group {group!r}"):
            pipe = self._client.pipeline(transaction=True)
            pipe.set(self._stats_key(group, name), bytes(data), px=px)
            pipe.sadd(self._stats_index_key(group), name)
            pipe.pexpire(self._stats_index_key(group), 2 * px)
            pipe.execute()

    def read_stats(self, group: str) -> dict[str, bytes]:
        """SMEMBERS of the index, then MGET of the summaries (two round trips); names whose summary expired are
        dropped from the index (unless one was published meanwhile)."""
        _check_group(group)
        index = self._stats_index_key(group)
        with self._errors(f"read the stats of group {group!r}"):
            names = sorted(_text(n) for n in self._client.smembers(index))
            values = self._client.mget([self._stats_key(group, n) for n in names]) if names else []
        found = {name: value.encode() if isinstance(value, str) else bytes(value)
                 for name, value in zip(names, values, strict=True) if value is not None}
        lapsed = [name for name in names if name not in found]
        if lapsed:
            keys = [self._stats_key(group, n) for n in lapsed]
            try:
                with self._errors(f"clean up lapsed stats of group {group!r}"):
                    with self._client.pipeline(transaction=True) as pipe:
                        pipe.watch(*keys)  # type: ignore[no-untyped-call]  # untyped in redis-py
                        still = [n for n, v in zip(lapsed, pipe.mget(keys), strict=True) if v is None]
                        if still:
                            pipe.multi()
                            pipe.srem(index, *still)
                            pipe.execute()
            except RegistryError as exc:  # best effort, as for lapsed members
                if not isinstance(exc.__cause__, redis.WatchError):
                    logger.debug("%s", exc)
        return found

    def lease_left(self, group: str) -> dict[str, float]:
        """SMEMBERS of the member index, then one PTTL per member in a pipeline (two round trips)."""
        _check_group(group)
        with self._errors(f"read the leases of group {group!r}"):
            names = sorted(_text(n) for n in self._client.smembers(self._members_key(group)))
            if not names:
                return {}
            pipe = self._client.pipeline(transaction=False)
            for name in names:
                pipe.pttl(self._peer_key(group, name))
            left = pipe.execute()
        # PTTL: -2 for a key that is gone, -1 for one without a TTL (never written so by us; not a lease).
        return {name: ms / 1000 for name, ms in zip(names, left, strict=True) if isinstance(ms, int) and ms >= 0}

    def __enter__(self) -> RedisRegistry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RedisRegistry({self.redacted_url!r}, namespace={self.namespace!r})"


# ------------------------------------------------------------------------------------------ in-memory


class InMemoryRegistry:
    """The registry contract inside one process: thread-safe, with an injectable monotonic `clock`.

    Entries are kept as JSON text, as Redis keeps them, so records round-trip through the same codec.

        >>> now = [0.0]
        >>> reg = InMemoryRegistry(clock=lambda: now[0])
        >>> reg.register("g", PeerRecord.new("w", "worker", "tcp://127.0.0.1:1"), ttl=1.0)
        >>> now[0] = 1.5
        >>> reg.members("g")
        {}
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[
            str, dict[str, tuple[str | bytes, float]]
        ] = {}  # group -> name -> (json, deadline)
        self._keys: dict[str, tuple[bytes, float]] = {}  # group -> (key, deadline)
        self._versions: dict[str, int] = {}  # group -> member-list version
        self._parsed: dict[str | bytes, PeerRecord] = {}  # entry text -> its record (records are immutable)
        self._stats: dict[str, dict[str, tuple[bytes, float]]] = {}  # group -> name -> (summary, deadline)
        self._closed = False
        self.malformed = 0

    def _check_open(self) -> None:
        if self._closed:
            raise RegistryError("in-memory registry is closed")

    def _live(self, group: str, name: str, now: float) -> bool:
        entry = self._entries.get(group, {}).get(name)
        return entry is not None and entry[1] > now

    def put_raw(self, group: str, name: str, value: str | bytes, ttl: float) -> None:
        """Store `value` verbatim as `name`'s entry: lets tests plant malformed entries."""
        _check_group(group)
        deadline = self._clock() + _ttl_ms(ttl) / 1000
        with self._lock:
            self._check_open()
            self._entries.setdefault(group, {})[name] = (value, deadline)
            self._bump(group)

    def register(self, group: str, record: PeerRecord, ttl: float) -> None:
        """Publish `record` with a lease of `ttl` seconds, replacing any entry of the same name."""
        self.put_raw(group, record.name, record.to_json(), ttl)

    def refresh(self, group: str, record: PeerRecord, ttl: float) -> bool:
        """Renew the lease (and rewrite the record); False if it had lapsed and was re-created."""
        _check_group(group)
        deadline_in = _ttl_ms(ttl) / 1000
        with self._lock:
            self._check_open()
            now = self._clock()
            existed = self._live(group, record.name, now)
            self._entries.setdefault(group, {})[record.name] = (record.to_json(), now + deadline_in)
            if not existed:
                self._bump(group)
        if not existed:
            logger.info("registry lease of %r in group %r had lapsed; registered again", record.name, group)
        return existed

    def unregister(self, group: str, name: str) -> None:
        """Delete a member's entry; a no-op if it is gone already."""
        _check_group(group)
        _check_name(name)
        with self._lock:
            self._check_open()
            if self._entries.get(group, {}).pop(name, None) is not None:
                self._bump(group)

    def members(self, group: str) -> dict[str, PeerRecord]:
        """Live members by name; expired entries are dropped, malformed ones counted and skipped."""
        _check_group(group)
        with self._lock:
            self._check_open()
            now = self._clock()
            entries = self._entries.get(group, {})
            if _drop_lapsed(entries, now):
                self._bump(group)
            raw = list(entries.items())
        live: dict[str, PeerRecord] = {}
        parsed = self._parsed
        for name, (value, _) in raw:
            try:
                record = parsed.get(value)  # an entry is rewritten verbatim at each refresh: parse it once
                if record is None:
                    record = PeerRecord.from_json(value)
                    if len(parsed) >= _PARSED_MAX:
                        parsed.clear()
                    parsed[value] = record
                if record.name != name:
                    raise RegistryError(f"malformed peer record: it names itself {record.name!r}")
            except RegistryError as exc:
                with self._lock:
                    self.malformed += 1
                logger.warning("in-memory registry: skipping entry %r of group %r: %s", name, group, exc)
                continue
            live[name] = record
        return live

    def _live_key(self, group: str, now: float) -> bytes | None:
        """The group's key unless it expired (then dropped). Call with the lock held."""
        held = self._keys.get(group)
        if held is not None and held[1] <= now:
            del self._keys[group]
            return None
        return None if held is None else held[0]

    def group_key(self, group: str, *, create: bool = True, ttl: float = GROUP_KEY_TTL) -> bytes:
        """The group's key; with `create`, the first caller's random key wins, and lives `ttl` s from now."""
        _check_group(group)
        life = _ttl_ms(ttl) / 1000
        with self._lock:
            self._check_open()
            now = self._clock()
            key = self._live_key(group, now)
            if create:
                key = key if key is not None else secrets.token_bytes(GROUP_KEY_BYTES)
                self._keys[group] = (key, now + life)
        if key is None:
            raise RegistryError(f"in-memory registry holds no key for group {group!r}")
        return key

    def ensure_group_key(self, group: str, key: bytes, *, ttl: float = GROUP_KEY_TTL) -> bytes:
        """Store `key` unless a key is held already; returns the key held afterwards (living `ttl` s more)."""
        _check_group(group)
        key = _check_key(key, where="the argument")
        life = _ttl_ms(ttl) / 1000
        with self._lock:
            self._check_open()
            now = self._clock()
            held = self._live_key(group, now)
            held = key if held is None else held
            self._keys[group] = (held, now + life)
            return held

    def renew_group_key(self, group: str, ttl: float = GROUP_KEY_TTL) -> bool:
        """Let the group's key live `ttl` seconds from now; False if it is gone (expired or never made)."""
        _check_group(group)
        life = _ttl_ms(ttl) / 1000
        with self._lock:
            self._check_open()
            now = self._clock()
            key = self._live_key(group, now)
            if key is None:
                return False
            self._keys[group] = (key, now + life)
            return True

    def members_version(self, group: str) -> int:
        """The group's member-list version (0 before anyone registered)."""
        _check_group(group)
        with self._lock:
            self._check_open()
            return self._versions.get(group, 0)

    def _bump(self, group: str) -> None:
        """The member list of `group` changed. Call with the lock held."""
        self._versions[group] = self._versions.get(group, 0) + 1

    def close(self) -> None:
        """Forget everything; later calls raise RegistryError. Idempotent."""
        with self._lock:
            self._closed = True
            self._entries.clear()
            self._keys.clear()
            self._stats.clear()

    def publish_stats(self, group: str, name: str, data: bytes, ttl: float) -> None:
        """Keep `data` as `name`'s summary for `ttl` seconds."""
        _check_group(group)
        _check_name(name)
        deadline = self._clock() + _ttl_ms(ttl) / 1000
        with self._lock:
            self._check_open()
            self._stats.setdefault(group, {})[name] = (bytes(data), deadline)

    def read_stats(self, group: str) -> dict[str, bytes]:
        """The summaries of `group` that have not expired, by name (expired ones are dropped)."""
        _check_group(group)
        with self._lock:
            self._check_open()
            now = self._clock()
            held = self._stats.get(group, {})
            _drop_lapsed(held, now)
            return {name: data for name, (data, _) in held.items()}

    def lease_left(self, group: str) -> dict[str, float]:
        """Seconds left on each live member's lease."""
        _check_group(group)
        with self._lock:
            self._check_open()
            now = self._clock()
            return {name: deadline - now for name, (_, deadline) in self._entries.get(group, {}).items()
                    if deadline > now}

    def __enter__(self) -> InMemoryRegistry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"InMemoryRegistry(groups={len(self._entries)})"


# ------------------------------------------------------------------------------------------- factory


_PARSED_MAX = 100_000  # parsed entries the in-memory registry remembers (forgotten all at once beyond that)


def _drop_lapsed(entries: dict[str, tuple[Any, float]], now: float) -> list[str]:
    """Remove the entries whose deadline has passed (the in-memory registry's expiry); returns their names."""
    lapsed = [name for name, (_, deadline) in entries.items() if deadline <= now]
    for name in lapsed:
        del entries[name]
    return lapsed


def registry_from(
    spec: Registry | str | tuple[str, int] | None = None,
    *,
    timeout: float = 2.0,
    namespace: str = "rallypoint",
) -> Registry:
    """A Registry from a URL, a ``(host, port)`` pair, a Registry (returned as is) or None.

    None means the URL in the environment variable ``RALLYPOINT_REGISTRY`` if set, else ``DEFAULT_URL``
    (a local Redis), so code written without a registry argument can be pointed elsewhere at deploy time.

    >>> registry_from(("127.0.0.1", 6379))
    RedisRegistry('redis://127.0.0.1:6379/0', namespace='rallypoint')
    """
    if spec is None:
        url = os.environ.get("RALLYPOINT_REGISTRY") or DEFAULT_URL
        return RedisRegistry(url, timeout=timeout, namespace=namespace)
    if isinstance(spec, str):
        return RedisRegistry(spec, timeout=timeout, namespace=namespace)
    if isinstance(spec, tuple):
        if (
            len(spec) != 2
            or not isinstance(spec[0], str)
            or isinstance(spec[1], bool)
            or not isinstance(spec[1], int)
        ):
            raise ConfigError(f"redis address must be a (host, port) pair, not {spec!r}")
        host, port = spec
        if ":" in host and not host.startswith("["):  # a bare IPv6 literal needs brackets in a URL
            host = f"[{host}]"
        return RedisRegistry(f"redis://{host}:{port}/0", timeout=timeout, namespace=namespace)
    if isinstance(spec, Registry):
        return spec
    raise ConfigError(
        f"cannot make a registry from {type(spec).__name__}: give a URL, (host, port) or a Registry"
    )
