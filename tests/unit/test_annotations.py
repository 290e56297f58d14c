"""buildx's --annotation: parsed from its forms, refused with a reason, rendered on the index."""

from __future__ import annotations

import json

import pytest

from polyarch.coordinator.core.model import InvalidRequest
from polyarch.coordinator.registry.annotations import parse_annotations
from polyarch.coordinator.registry.index import ChildManifest, index_media_type, render_index
from polyarch.proto.media_types import DOCKER_MANIFEST, OCI_INDEX
from polyarch.proto.platforms import parse_platform

AMD, ARM = parse_platform("linux/amd64"), parse_platform("linux/arm64")
CHILDREN = [ChildManifest(AMD, "sha256:" + "a" * 64, DOCKER_MANIFEST, 10),
            ChildManifest(ARM, "sha256:" + "b" * 64, DOCKER_MANIFEST, 11)]  # fmt: skip


def test_index_and_descriptor_annotations_land_where_buildx_puts_them() -> None:
    annotations = parse_annotations(
        [
            "index:org.opencontainers.image.description=a multi-arch app",
            "manifest-descriptor:org.example.all=yes",
            "manifest-descriptor[linux/arm64]:org.example.arch=arm=64",  # '=' in the value
        ],
        [AMD, ARM],
    )
    index = json.loads(render_index(CHILDREN, annotations))
    assert index["mediaType"] == OCI_INDEX  # a Docker manifest list cannot carry them
    assert index["annotations"] == {"org.opencontainers.image.description": "a multi-arch app"}
    by_arch = {m["platform"]["architecture"]: m.get("annotations") for m in index["manifests"]}
    assert by_arch == {
        "amd64": {"org.example.all": "yes"},
        "arm64": {"org.example.all": "yes", "org.example.arch": "arm=64"},
    }


def test_without_annotations_the_index_is_what_it_was() -> None:
    plain = json.loads(render_index(CHILDREN))
    assert "annotations" not in plain and all("annotations" not in m for m in plain["manifests"])
    assert index_media_type(CHILDREN) != OCI_INDEX  # all Docker children: a manifest list


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("org.example.x=1", "manifest annotations are not supported"),  # buildx's default
        ("manifest:org.example.x=1", "docker agents (docker build) cannot annotate them"),
        ("index-descriptor:org.example.x=1", "no OCI layout output"),
        ("index:no-value", "expected [TYPE:]KEY=VALUE"),
        ("index[linux/amd64]:k=v", "an index: annotation takes no platform"),
        ("manifest-descriptor[linux/s390x]:k=v", "linux/s390x is not one of this build's"),
        ("manifest-descriptor[linux/sparc]:k=v", "unknown architecture 'sparc'"),
    ],
)
def test_what_cannot_be_honoured_is_refused_naming_the_spec(spec: str, says: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_annotations([spec], [AMD, ARM])
    assert says in str(caught.value) and repr(spec) in str(caught.value)
