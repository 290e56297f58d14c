"""The caps on a submission: each refusal names the field, its size and the limit."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from polyarch.coordinator.contexts.store import ContextStore
from polyarch.coordinator.core.model import BuildSpec, LimitExceeded
from polyarch.coordinator.core.validation import validate_spec
from polyarch.coordinator.limits import Limits
from polyarch.coordinator.wire.caps import MAX_REFERENCE_BYTES, check_caps

CONTEXT = b"caps"
DIGEST = "sha256:" + hashlib.sha256(CONTEXT).hexdigest()
SMALL = Limits(max_tags=2, max_platforms=2, max_build_args=2, max_labels=2, max_key_bytes=8,
               max_value_bytes=16, max_args_and_labels_bytes=40, max_path_bytes=32)  # fmt: skip


def spec(**changes: object) -> BuildSpec:
    base = BuildSpec(DIGEST, "Dockerfile", ["linux/amd64"], ["127.0.0.1:5000/team/app:1"])
    for name, value in changes.items():
        setattr(base, name, value)
    return base


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"tags": [f"127.0.0.1:5000/a/b:{i}" for i in range(3)]},
         "3 tags in one build; the limit is 2 (max_tags)"),
        ({"platforms": ["linux/amd64", "linux/arm64", "linux/s390x"]},
         "3 platforms in one build; the limit is 2 (max_platforms)"),
        ({"cache_from": ["r/a:1", "r/a:2", "r/a:3"]},
         "3 cache_from references in one build; the limit is 2 (max_tags)"),
        ({"build_args": {"A": "1", "B": "2", "C": "3"}},
         "3 build args in one build; the limit is 2 (max_build_args)"),
        ({"labels": {"a": "1", "b": "2", "c": "3"}},
         "3 labels in one build; the limit is 2 (max_labels)"),
        ({"build_args": {"LONG_NAME_X": "1"}},
         "build args: a name of 11 bytes ('LONG_NAME_X'...); the limit is 8 bytes (max_key_bytes)"),
        ({"labels": {"k": "v" * 17}},
         "labels: the value of 'k' has 17 bytes; the limit is 16 bytes (max_value_bytes)"),
        ({"build_args": {"A": "x" * 16, "B": "y" * 16}, "labels": {"c": "z" * 16}},
         "build args and labels hold 51 bytes together; the limit is 40 "
         "(max_args_and_labels_bytes)"),
        ({"dockerfile": "d/" * 20 + "Dockerfile"}, "the dockerfile path of 50 bytes"),
        ({"target": "t" * 33}, "the target of 33 bytes"),
        ({"tags": [" " * MAX_REFERENCE_BYTES + "r/a:1"]},
         f"a tag of {MAX_REFERENCE_BYTES + 5} bytes"),
    ],
)  # fmt: skip
def test_each_cap_is_refused_naming_the_field_the_size_and_the_limit(
    changes: dict[str, object], expected: str
) -> None:
    with pytest.raises(LimitExceeded) as caught:
        check_caps(spec(**changes), SMALL)
    assert expected in str(caught.value)


def test_a_spec_at_every_limit_passes() -> None:
    check_caps(
        spec(tags=["r/a:1", "r/a:2"], platforms=["linux/amd64", "linux/arm64"],
             build_args={"A": "x" * 16}, labels={"b": "y" * 16}, dockerfile="D" * 32,
             target="t" * 32),
        SMALL,
    )  # fmt: skip


def test_caps_run_before_the_tags_are_parsed_or_the_context_looked_up(tmp_path: Path) -> None:
    """40,000 tags are refused by count, not by parsing each (nor by a missing context)."""
    many = spec(tags=[f"not a valid tag {i}" for i in range(40_000)], context_digest="bogus")
    with pytest.raises(LimitExceeded) as caught:
        validate_spec(many, ContextStore(tmp_path))
    assert str(caught.value) == "40000 tags in one build; the limit is 64 (max_tags)"
