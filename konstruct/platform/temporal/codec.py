"""Payloads encrypted in Temporal's history: AES-256-GCM, keys that rotate.

Temporal stores every workflow input and result, activity argument and result,
signal, update, query and failure message as a payload in its history, readable
by anyone with Web UI or CLI access to the namespace. `EncryptionCodec` encrypts
each one before it leaves the process and decrypts what comes back; the Web UI
and `temporal workflow show --codec-endpoint` read them through the codec server
(`konstruct codec-server`, `konstruct.platform.temporal.codec_server`).

An encrypted payload is `nonce (12 bytes) || AES-GCM ciphertext` of the original
payload's protobuf bytes, with metadata `encoding: binary/encrypted` and
`encryption-key-id: <id>`; the key id is also the cipher's associated data, so a
payload cannot be passed off as another key's. New payloads use the newest key;
any key a process holds still decodes what it encrypted, so keys rotate by
adding one. A payload of a key this process lacks, or one that does not
authenticate, fails with `CodecError` naming the key id — never garbage.

Keys come from `KONSTRUCT_ENCRYPTION_KEYS` (`id:base64,id:base64`, the last is
the newest) or the file `KONSTRUCT_ENCRYPTION_KEY_FILE` (one `id:base64` a line);
`konstruct up` generates one into its state directory when neither is set.
Search attributes are not payloads of this codec: they stay plain, to be
filterable, and never carry message text.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

from konstruct.platform.errors import ConfigError
from konstruct.platform.temporal.failures import PlainMessage

ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"
KEY_BYTES = 32
NONCE_BYTES = 12
KEYS_ENV = "KONSTRUCT_ENCRYPTION_KEYS"
_KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class CodecError(PlainMessage, ValueError):
    """A payload this process cannot decrypt: a key it lacks, or one that does not fit.
    Its message names key ids only, so a failure it causes stays readable in history
    (a worker's failed workflow task says which key it lacks)."""


@dataclass(frozen=True)
class KeyRing:
    """Encryption keys by id; `current` encrypts, every key decrypts."""

    keys: Mapping[str, bytes]
    current: str

    @classmethod
    def parse(cls, text: str, source: str) -> KeyRing:
        """`id:base64` entries separated by commas or lines; the last is the newest."""
        keys: dict[str, bytes] = {}
        lines = [line.split("#", 1)[0] for line in text.splitlines()]
        entries = [e.strip() for line in lines for e in line.split(",") if e.strip()]
        for number, entry in enumerate(entries, 1):
            key_id, sep, encoded = entry.partition(":")
            if not sep or not _KEY_ID.match(key_id):
                raise ConfigError(
                    f"{source}: entry {number} must be <id>:<base64 key>, the id of letters,"
                    " digits, '.', '_' or '-'"
                )
            try:
                key = base64.b64decode(encoded.strip(), validate=True)
            except binascii.Error:
                raise ConfigError(f"{source}: key {key_id!r} is not base64") from None
            if len(key) != KEY_BYTES:
                raise ConfigError(
                    f"{source}: key {key_id!r} is {len(key)} bytes; AES-256 needs {KEY_BYTES}"
                )
            keys[key_id] = key
        if not keys:
            raise ConfigError(f"{source}: no key")
        return cls(keys, list(keys)[-1])


def new_key_line(key_id: str) -> str:
    """A fresh random key as a key-file line."""
    return f"{key_id}:{base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()}"


class EncryptionCodec(PayloadCodec):
    def __init__(self, ring: KeyRing) -> None:
        self.ring = ring
        self._ciphers = {key_id: AESGCM(key) for key_id, key in ring.keys.items()}

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.encrypt(p) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.decrypt(p) for p in payloads]

    def encrypt(self, payload: Payload) -> Payload:
        key_id = self.ring.current
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._ciphers[key_id].encrypt(nonce, payload.SerializeToString(), key_id.encode())
        return Payload(
            metadata={"encoding": ENCODING, KEY_ID: key_id.encode()}, data=nonce + sealed
        )

    def decrypt(self, payload: Payload) -> Payload:
        if payload.metadata.get("encoding") != ENCODING:
            return payload  # written before encryption was on: plain as it is
        key_id = payload.metadata.get(KEY_ID, b"").decode(errors="replace")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise CodecError(
                f"payload encrypted with key {key_id!r}, which this process does not have"
                f" (it has {', '.join(sorted(self._ciphers))}; see {KEYS_ENV})"
            )
        try:
            plain = cipher.decrypt(
                payload.data[:NONCE_BYTES], payload.data[NONCE_BYTES:], key_id.encode()
            )
        except InvalidTag:
            raise CodecError(
                f"payload under key {key_id!r} does not decrypt: the key of that id differs"
                " from the one that encrypted it, or the payload was altered"
            ) from None
        decoded = Payload()
        decoded.ParseFromString(plain)
        return decoded
