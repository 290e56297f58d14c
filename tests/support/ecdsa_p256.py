"""A textbook ECDSA P-256 verifier in pure Python: checks our signatures without OpenSSL."""

from __future__ import annotations

import base64
import hashlib

from cryptography.hazmat.primitives import serialization

# NIST P-256 (FIPS 186-4, D.1.2.3): the curve y^2 = x^3 - 3x + b over GF(p), base point G of
# prime order n. Written out here so that no library's curve code is involved.
P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
A = P - 3
B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
G = (
    0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
    0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5,
)

Point = tuple[int, int] | None


def _add(p1: Point, p2: Point) -> Point:
    if p1 is None:
        return p2
    if p2 is None:
        return p1
    (x1, y1), (x2, y2) = p1, p2
    if x1 == x2 and (y1 + y2) % P == 0:
        return None
    if p1 == p2:
        slope = (3 * x1 * x1 + A) * pow(2 * y1, -1, P) % P
    else:
        slope = (y2 - y1) * pow(x2 - x1, -1, P) % P
    x3 = (slope * slope - x1 - x2) % P
    return x3, (slope * (x1 - x3) - y1) % P


def _mul(k: int, point: Point) -> Point:
    result: Point = None
    while k:
        if k & 1:
            result = _add(result, point)
        point = _add(point, point)
        k >>= 1
    return result


def _der_integers(der: bytes) -> tuple[int, int]:
    """(r, s) of a DER `SEQUENCE { INTEGER r, INTEGER s }` (short lengths: P-256 fits)."""
    if der[0] != 0x30 or der[1] != len(der) - 2:
        raise ValueError("not a DER sequence")
    values, at = [], 2
    for _ in range(2):
        if der[at] != 0x02:
            raise ValueError("not a DER integer")
        length = der[at + 1]
        values.append(int.from_bytes(der[at + 2 : at + 2 + length], "big"))
        at += 2 + length
    if at != len(der):
        raise ValueError("trailing bytes after the signature")
    return values[0], values[1]


def public_point(pem: bytes) -> tuple[int, int]:
    """The public key's point, from its uncompressed SEC1 encoding (04 || x || y): only the
    PEM/DER unwrapping uses `cryptography`, none of the arithmetic."""
    key = serialization.load_pem_public_key(pem)
    raw = key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    assert raw[0] == 4 and len(raw) == 65
    x, y = int.from_bytes(raw[1:33], "big"), int.from_bytes(raw[33:], "big")
    assert (y * y - (x * x * x + A * x + B)) % P == 0, "the point is not on P-256"
    return x, y


def verify(public_pem: bytes, payload: bytes, signature_b64: str) -> bool:
    """ECDSA verification (SEC 1, 4.1.4) of a base64 DER signature over SHA-256(payload)."""
    r, s = _der_integers(base64.b64decode(signature_b64))
    if not (1 <= r < N and 1 <= s < N):
        return False
    e = int.from_bytes(hashlib.sha256(payload).digest(), "big")
    w = pow(s, -1, N)
    point = _add(_mul(e * w % N, G), _mul(r * w % N, public_point(public_pem)))
    return point is not None and point[0] % N == r
