"""buildx's --annotation on the image index: its [TYPE[PLATFORMS]:]KEY=VALUE form, checked."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from polyarch.coordinator.core.model import InvalidRequest
from polyarch.proto.platforms import Platform, PlatformError, parse_platform

# index:KEY=V, manifest-descriptor:KEY=V, manifest-descriptor[linux/amd64,linux/arm64]:KEY=V
_SPEC = re.compile(r"^(?P<type>[a-z-]+)(?:\[(?P<platforms>[^\]]*)\])?:(?P<rest>.*)$", re.S)
SUPPORTED = ("index", "manifest-descriptor")
# What the farm cannot put there yet, and why (said in the refusal).
_REFUSED = {
    "manifest": "the image manifests are made by each agent's builder, and docker agents "
    "(docker build) cannot annotate them",
    "index-descriptor": "there is no OCI layout output (--output type=oci) yet",
}


@dataclass(frozen=True)
class IndexAnnotations:
    """Annotations for the index itself and for its entries (all, or per platform)."""

    index: dict[str, str] = field(default_factory=dict)
    # platform -> annotations of that entry; the None key holds those of every entry
    descriptors: dict[Platform | None, dict[str, str]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.index or self.descriptors)

    def for_entry(self, platform: Platform) -> dict[str, str]:
        return {**self.descriptors.get(None, {}), **self.descriptors.get(platform, {})}


def parse_annotations(specs: Sequence[str], platforms: Sequence[Platform]) -> IndexAnnotations:
    """Parses buildx's forms; raises InvalidRequest naming the spec that cannot be honoured.

    Without a prefix buildx annotates the image manifests ("manifest:"), which needs the
    builders' help: refused, like index-descriptor, with the reason."""
    parsed = IndexAnnotations()
    for spec in specs:
        kind, scope, key, value = _split(spec)
        if kind == "index":
            if scope:
                raise InvalidRequest(f"annotation {spec!r}: an index: annotation takes no platform")
            parsed.index[key] = value
            continue
        targets: list[Platform | None] = list(scope) or [None]
        for platform in targets:
            if platform is not None and platform not in platforms:
                raise InvalidRequest(
                    f"annotation {spec!r}: {platform} is not one of this build's platforms"
                )
            parsed.descriptors.setdefault(platform, {})[key] = value
    return parsed


def _split(spec: str) -> tuple[str, list[Platform], str, str]:
    match = _SPEC.match(spec)
    kind, rest, scope_text = ("manifest", spec, None) if match is None else (
        match["type"], match["rest"], match["platforms"])  # fmt: skip
    if "=" in kind or kind not in (*SUPPORTED, *_REFUSED):
        kind, rest, scope_text = "manifest", spec, None  # a key with a colon, no prefix
    if kind in _REFUSED:
        raise InvalidRequest(
            f"annotation {spec!r}: {kind} annotations are not supported ({_REFUSED[kind]}); "
            "use index: or manifest-descriptor:"
        )
    key, sep, value = rest.partition("=")
    if not sep or not key.strip():
        raise InvalidRequest(f"annotation {spec!r}: expected [TYPE:]KEY=VALUE")
    scope: list[Platform] = []
    for text in filter(None, (scope_text or "").split(",")):
        try:
            scope.append(parse_platform(text.strip()))
        except PlatformError as exc:
            raise InvalidRequest(f"annotation {spec!r}: {exc}") from None
    return kind, scope, key.strip(), value


def annotated(entry: Mapping[str, object], annotations: Mapping[str, str]) -> dict[str, object]:
    """An index entry (or the index) with annotations added, when there are any."""
    return {**entry, "annotations": dict(annotations)} if annotations else dict(entry)
