"""Image references (registry/repository[:tag][@digest]): the one parser, Docker's rules."""

from __future__ import annotations

import re
from dataclasses import dataclass

DOCKER_HUB = "docker.io"
_NAME_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_NAME_COMPONENT}(?:/{_NAME_COMPONENT})*$")
_DOMAIN = re.compile(
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:.]+\])(?::[0-9]{1,5})?$"
)
TAG_PATTERN = re.compile(r"^[\w][\w.-]{0,127}$")
DIGEST_PATTERN = re.compile(r"^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$")


class ReferenceError(ValueError):
    """A malformed image reference; the message names what is wrong."""


@dataclass(frozen=True)
class ImageReference:
    """A normalised image reference: registry/repository[:tag][@digest]."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def repository_ref(self) -> str:
        """`registry/repository`, the form used as a push target."""
        return f"{self.registry}/{self.repository}"

    @property
    def reference(self) -> str:
        """What goes in /v2/<name>/manifests/<reference>: the digest if any, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        text = self.repository_ref
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def is_digest(reference: str) -> bool:
    """True when a manifest reference is a (well-formed) digest rather than a tag."""
    return DIGEST_PATTERN.match(reference) is not None


def names_registry(first_component: str) -> bool:
    """Docker's rule: the part before the first '/' is a registry when it has a '.' or ':',
    is `localhost`, or has capitals; otherwise the reference is on Docker Hub."""
    first = first_component
    return "." in first or ":" in first or first == "localhost" or first != first.lower()


def registry_of(normalised: str) -> str:
    """The registry of a reference already normalised by parse_reference (what jobs carry:
    `registry/repository[:tag]`, the registry always named)."""
    return normalised.split("/", 1)[0]


def parse_reference(text: str, default_tag: str | None = "latest") -> ImageReference:
    """Parses an image reference with Docker's normalisation (docker.io, library/, latest);
    `default_tag=None` leaves `tag` None when the text names neither tag nor digest."""
    raw = text.strip()
    if not raw:
        raise ReferenceError("empty image reference")
    name, _, digest = raw.partition("@")
    if "@" in raw and not DIGEST_PATTERN.match(digest):
        raise ReferenceError(
            f"invalid digest {digest!r} in {text!r}: expected sha256:<64 lowercase hex>"
        )
    tag: str | None = None
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > last_slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not TAG_PATTERN.match(tag):
            raise ReferenceError(
                f"invalid tag {tag!r} in {text!r}: up to 128 of [A-Za-z0-9_.-], "
                "not starting with '.' or '-'"
            )
    first, sep, rest = name.partition("/")
    if sep and names_registry(first):
        registry, repository = first, rest
        if not _DOMAIN.match(registry):
            raise ReferenceError(f"invalid registry {registry!r} in {text!r}")
        if registry in ("index.docker.io", "registry-1.docker.io"):
            registry = DOCKER_HUB
    else:
        registry, repository = DOCKER_HUB, name
    if not repository:
        raise ReferenceError(f"missing repository name in {text!r}")
    if repository != repository.lower():
        raise ReferenceError(f"repository name {repository!r} in {text!r} must be lowercase")
    if not _REPOSITORY.match(repository):
        raise ReferenceError(
            f"invalid repository name {repository!r} in {text!r}: path components are "
            "lowercase letters and digits separated by '.', '_', '__' or '-'"
        )
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    if len(f"{registry}/{repository}") > 255:
        raise ReferenceError(f"repository name in {text!r} is longer than 255 characters")
    if tag is None and not digest:
        tag = default_tag
    return ImageReference(registry, repository, tag, digest or None)
