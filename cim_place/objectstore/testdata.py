"""Deterministic generated content: the inputs of the UnixFS test vectors, benches and the demo.

The bytes are kubo's own deterministic test data, so root CIDs can be compared with the ones
kubo records: the ChaCha20 (RFC 8439) keystream with key = sha256(seed as UTF-8), an all-zero
12-byte nonce and block counter 0, truncated to ``size`` bytes. The stream is generated on the
fly in constant memory, so gigabyte inputs never exist in memory or on disk.

ChaCha20 comes from ``cryptography``, a runtime dependency of cim-place. There is deliberately no
fallback generator: different bytes under the same seed would make every vector fail in a
confusing way instead of failing at import.
"""

from __future__ import annotations

import hashlib
import io

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_STEP = 1 << 20
"""Keystream bytes generated per call: large enough to amortise the call, small in memory."""


class ChaChaStream(io.RawIOBase):
    """A read-only file object over ``size`` bytes of the ChaCha20 keystream of ``seed``."""

    def __init__(self, seed: str, size: int) -> None:
        super().__init__()
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        key = hashlib.sha256(seed.encode("utf-8")).digest()
        # cryptography takes a 16-byte nonce: 4-byte little-endian counter + 12-byte nonce.
        self._cipher = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()
        self._zeros = memoryview(bytes(min(size, _STEP)))
        self.size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    @property
    def remaining(self) -> int:
        return self.size - self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        out = memoryview(buffer).cast("B")
        want = min(len(out), self.size - self._pos)
        done = 0
        while done < want:
            n = min(want - done, len(self._zeros))
            # XOR of zeros with the keystream is the keystream itself.
            self._cipher.update_into(self._zeros[:n], out[done : done + n])
            done += n
        self._pos += done
        return done

    def read(self, size: int = -1, /) -> bytes:
        if size is None or size < 0:
            size = self.size - self._pos
        buf = bytearray(min(size, self.size - self._pos))
        n = self.readinto(buf)
        return bytes(buf[:n]) if n < len(buf) else bytes(buf)

    def readall(self) -> bytes:
        return self.read(-1)


def chacha_stream(seed: str, size: int) -> ChaChaStream:
    """``size`` bytes of kubo's deterministic test data for ``seed``, as a readable file object."""
    return ChaChaStream(seed, size)
