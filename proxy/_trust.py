"""The trust root the registry does not hold: a group secret, the group key derived from it, signed records.

With a secret (``Proxy(..., secret=...)`` or ``RALLYPOINT_SECRET``), every member derives the same group key
from the secret and the group name, and nothing secret is ever written to the registry. Each member signs its
own `PeerRecord` with that key, and a member takes only records that verify under it: someone who can write
to the registry can delete entries (deny service) but can neither add a member nor redirect one, and without
the key cannot forge a frame. Pure functions, no I/O.

    >>> key = derive_group_key(b"correct horse battery staple", "master-worker")
    >>> record = sign_record(PeerRecord.new("w1", "worker", "tcp://127.0.0.1:5555"), key)
    >>> verify_record(record, key)
    True
    >>> verify_record(record, derive_group_key(b"correct horse battery staple", "other-group"))
    False
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import fields, replace

from rallypoint.errors import ConfigError

from ._registry import GROUP_KEY_BYTES, PeerRecord

__all__ = [
    "MIN_SECRET_BYTES",
    "SECRET_ENV",
    "derive_group_key",
    "key_id",
    "record_problem",
    "secret_from",
    "sign_record",
    "signer_id",
    "split_trusted",
    "verify_record",
]

SECRET_ENV = "RALLYPOINT_SECRET"
MIN_SECRET_BYTES = 16  # after UTF-8 encoding; a random one of 32 bytes or more is what to use

_KEY_ID_BYTES = 4  # a fingerprint for humans, not a security boundary
_MAC_BYTES = 32
_SIGNATURE_HEX = 2 * (_KEY_ID_BYTES + _MAC_BYTES)
_DOMAIN = b"rallypoint peer record v1\x00"


def secret_from(value: str | bytes | None, env: Mapping[str, str]) -> bytes | None:
    """The group secret: `value` if given, else ``env["RALLYPOINT_SECRET"]`` if set, else None (no secret).

    A secret given (argument or environment variable) must hold at least 16 bytes once UTF-8 encoded; an
    empty or shorter one is a `ConfigError` rather than a silent fall-back to running without one. It is
    taken verbatim (no stripping). It should be random, for example ``secrets.token_urlsafe(32)``: whoever
    reads the registry can test guesses against any signed record offline.

        >>> secret_from(None, {"RALLYPOINT_SECRET": "0123456789abcdef"})
        b'0123456789abcdef'
        >>> secret_from(None, {}) is None
        True
    """
    if value is not None:
        where = "secret="
        raw = value
    elif SECRET_ENV in env:
        where = f"${SECRET_ENV}"
        raw = env[SECRET_ENV]
    else:
        return None
    if isinstance(raw, str):
        try:
            secret = raw.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ConfigError(f"{where}: the group secret is not valid text: {exc.reason}") from exc
    elif isinstance(raw, (bytes, bytearray)):
        secret = bytes(raw)
    else:
        raise ConfigError(f"{where}: the group secret must be str or bytes, not {type(raw).__name__}")
    if not secret:
        raise ConfigError(f"{where}: the group secret is empty; leave it unset to run without one")
    _check_secret_length(secret, where)
    return secret


def _check_secret_length(secret: bytes, where: str) -> None:
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"{where}: the group secret is {len(secret)} bytes; it must be at least {MIN_SECRET_BYTES} "
            f"(use a random one, e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )


def derive_group_key(secret: bytes, group: str) -> bytes:
    """The 32-byte group key for `group` under `secret`: the same in every member, never sent anywhere.

    The secret is first hashed to a 64-byte BLAKE2b key (so secrets of any length are taken), which then
    keys a BLAKE2b of the group name, each step with its own personalisation.
    """
    if not isinstance(secret, (bytes, bytearray)):
        raise ConfigError(f"the group secret must be bytes, not {type(secret).__name__}")
    _check_secret_length(bytes(secret), "derive_group_key")
    if not isinstance(group, str) or not group:
        raise ConfigError(f"group name must be a non-empty string, not {group!r}")
    root = hashlib.blake2b(bytes(secret), digest_size=64, person=b"rp-secret-v1").digest()
    return hashlib.blake2b(
        group.encode("utf-8", "surrogatepass"), key=root, digest_size=GROUP_KEY_BYTES, person=b"rp-group-key-v1"
    ).digest()


def handshake_token(key: bytes) -> bytes:
    """The password a member presents at the ZeroMQ handshake (ZAP, PLAIN): derived from the group key, so only
    a key holder knows it, and useless for anything else (it travels in the clear; it is not the key).

        >>> len(handshake_token(bytes(32)))
        32
    """
    return hashlib.blake2b(b"handshake", key=bytes(key)[:64], digest_size=32, person=b"rp-zap-token-v1").digest()


def key_id(key: bytes) -> str:
    """A short non-secret fingerprint of a key (8 hex digits), for logs and error messages.

    It tells two keys apart; it is no proof of anything (the one inside a signature is not authenticated).
    """
    return hashlib.blake2b(bytes(key), digest_size=_KEY_ID_BYTES, person=b"rp-key-id-v1").hexdigest()


def _canonical(record: PeerRecord) -> bytes:
    """Every field but the signature, in declaration order, each named, typed and length-prefixed."""
    parts = [_DOMAIN]
    for field in fields(record):
        if field.name == "signature":
            continue
        value = getattr(record, field.name)
        if field.name == "started_at":  # a float field: an int that JSON kept as such signs the same
            data = b"f" + float(value).hex().encode("ascii")
        elif isinstance(value, str):
            data = b"s" + value.encode("utf-8", "surrogatepass")
        elif isinstance(value, int):
            data = b"i" + str(value).encode("ascii")
        else:  # a field added later without a rule here must not go unsigned
            raise TypeError(f"no canonical encoding for PeerRecord.{field.name} ({type(value).__name__})")
        name = field.name.encode("ascii")
        parts += [len(name).to_bytes(4, "big"), name, len(data).to_bytes(4, "big"), data]
    return b"".join(parts)


def _mac(record: PeerRecord, key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) != GROUP_KEY_BYTES:
        raise ConfigError(f"a record key must be {GROUP_KEY_BYTES} bytes")
    return hashlib.blake2b(
        _canonical(record), key=bytes(key), digest_size=_MAC_BYTES, person=b"rp-peer-record"
    ).digest()


def sign_record(record: PeerRecord, key: bytes) -> PeerRecord:
    """`record` with its `signature` set: the key's id, then a keyed BLAKE2b over every other field (hex)."""
    tag = bytes.fromhex(key_id(key)) + _mac(record, key)
    return replace(record, signature=tag.hex())


def verify_record(record: PeerRecord, key: bytes) -> bool:
    """Whether `record` was signed with `key` and not changed since (constant-time comparison)."""
    if len(record.signature) != _SIGNATURE_HEX:
        return False
    try:
        given = bytes.fromhex(record.signature)
    except ValueError:
        return False
    expected = bytes.fromhex(key_id(key)) + _mac(record, key)
    return hmac.compare_digest(given, expected)


def signer_id(record: PeerRecord) -> str | None:
    """The key id a signature claims (unauthenticated: for messages only), or None if unsigned or malformed."""
    if len(record.signature) != _SIGNATURE_HEX:
        return None
    return record.signature[: 2 * _KEY_ID_BYTES]


def record_problem(record: PeerRecord, key: bytes | None) -> str | None:
    """Why a member holding `key` (None: no secret) must not take `record`, in words; None if it may.

    Without a secret, unsigned records are taken (the registry is the trust root) and a signed one is
    refused: it comes from a member that has a secret, which this one could not talk to anyway.
    """
    claimed = signer_id(record)
    if key is None:
        if not record.signature:
            return None
        return (
            f"its record is signed (key {claimed or '?'}): {record.name!r} runs with a group secret and this "
            f"member does not (give secret= or set {SECRET_ENV})"
        )
    if not record.signature:
        return (
            f"its record is unsigned: {record.name!r} runs without the group secret, or someone else wrote "
            f"the entry (this member has key {key_id(key)})"
        )
    if verify_record(record, key):
        return None
    ours = key_id(key)
    if claimed is not None and claimed != ours:
        return (
            f"its record is signed with key {claimed}, this member's is {ours}: a different group secret "
            f"(or a forged entry)"
        )
    return "its record's signature does not match its contents: the entry was altered or forged in the registry"


def split_trusted(
    records: Mapping[str, PeerRecord], key: bytes | None
) -> tuple[dict[str, PeerRecord], dict[str, str]]:
    """`records` split into those a member holding `key` takes and, by name, why it refuses the others.

        >>> k = derive_group_key(b"0123456789abcdef", "g")
        >>> good = sign_record(PeerRecord.new("a", "worker", "tcp://127.0.0.1:1"), k)
        >>> bad = PeerRecord.new("b", "worker", "tcp://127.0.0.1:2")
        >>> taken, refused = split_trusted({"a": good, "b": bad}, k)
        >>> sorted(taken), sorted(refused)
        (['a'], ['b'])
    """
    taken: dict[str, PeerRecord] = {}
    refused: dict[str, str] = {}
    for name, record in records.items():
        problem = record_problem(record, key)
        if problem is None:
            taken[name] = record
        else:
            refused[name] = problem
    return taken, refused
