"""Size and count caps on a build submission, checked before anything is parsed or stored."""

from __future__ import annotations

from collections.abc import Mapping

from polyarch.coordinator.core.model import BuildSpec, LimitExceeded
from polyarch.coordinator.limits import Limits

# An image reference is at most 255 characters of name, ':' and a 128-character tag
# (registry.parse_reference enforces both); anything longer is refused before parsing.
MAX_REFERENCE_BYTES = 512


def check_caps(spec: BuildSpec, limits: Limits) -> None:
    """Raises LimitExceeded (RESOURCE_EXHAUSTED) naming the field, its size and the limit.

    Runs first: a request of 40,000 tags is refused without parsing one of them, and what
    passes bounds every record the coordinator keeps, lists and sends to agents."""
    _count("tags", len(spec.tags), limits.max_tags, "max_tags")
    _count("platforms", len(spec.platforms), limits.max_platforms, "max_platforms")
    _count("cache_from references", len(spec.cache_from), limits.max_tags, "max_tags")
    _count("cache_to references", len(spec.cache_to), limits.max_tags, "max_tags")
    for field, references in (("tag", spec.tags), ("cache_from", spec.cache_from),
                              ("cache_to", spec.cache_to)):  # fmt: skip
        for reference in references:
            _size(f"a {field}", reference, MAX_REFERENCE_BYTES, "image reference format")
    for text in spec.platforms:
        _size("a platform", text, MAX_REFERENCE_BYTES, "platform format")
    _count("annotations", len(spec.annotations), limits.max_labels, "max_labels")
    for annotation in spec.annotations:
        bound = limits.max_key_bytes + limits.max_value_bytes + MAX_REFERENCE_BYTES
        _size("an annotation", annotation, bound, "max_key_bytes + max_value_bytes")
    _size("the dockerfile path", spec.dockerfile, limits.max_path_bytes, "max_path_bytes")
    _size("the target", spec.target, limits.max_path_bytes, "max_path_bytes")
    total = _pairs("build args", spec.build_args, limits.max_build_args, "max_build_args", limits)
    total += _pairs("labels", spec.labels, limits.max_labels, "max_labels", limits)
    if total > limits.max_args_and_labels_bytes:
        raise LimitExceeded(
            f"build args and labels hold {total} bytes together; the limit is "
            f"{limits.max_args_and_labels_bytes} (max_args_and_labels_bytes)"
        )


def _count(what: str, count: int, limit: int, name: str) -> None:
    if count > limit:
        raise LimitExceeded(f"{count} {what} in one build; the limit is {limit} ({name})")


def _size(what: str, text: str, limit: int, name: str) -> None:
    size = len(text.encode())
    if size > limit:
        raise LimitExceeded(
            f"{what} of {size} bytes ({text[:40]!r}...); the limit is {limit} bytes ({name})"
        )


def _pairs(what: str, pairs: Mapping[str, str], limit: int, name: str, limits: Limits) -> int:
    """Checks a map's count and each key's and value's size; returns its total bytes."""
    _count(what, len(pairs), limit, name)
    total = 0
    for key, value in pairs.items():
        key_size, value_size = len(key.encode()), len(value.encode())
        if key_size > limits.max_key_bytes:
            raise LimitExceeded(
                f"{what}: a name of {key_size} bytes ({key[:40]!r}...); the limit is "
                f"{limits.max_key_bytes} bytes (max_key_bytes)"
            )
        if value_size > limits.max_value_bytes:
            raise LimitExceeded(
                f"{what}: the value of {key[:40]!r} has {value_size} bytes; the limit is "
                f"{limits.max_value_bytes} bytes (max_value_bytes)"
            )
        total += key_size + value_size
    return total
