"""--output and --load as buildx spells them: what publishes, what is refused and why."""

from __future__ import annotations

import pytest

from polyarch.client.outputs import OutputError, publishes


@pytest.mark.parametrize(
    ("outputs", "push", "expected"),
    [
        ([], False, True),  # polyarch's default: push
        ([], True, True),
        (["type=registry"], False, True),
        (["type=image,push=true"], False, True),
        (["type=image,push=false"], False, False),
        (["type=image"], False, False),  # buildx: an image output pushes only when asked
        (["type=none"], False, False),
        (["type=image,push=false"], True, True),  # --push with an --output pushes as well
    ],
)
def test_which_outputs_publish(outputs: list[str], push: bool, expected: bool) -> None:
    assert publishes(outputs, push, load=False) is expected


@pytest.mark.parametrize(
    ("outputs", "load", "says"),
    [
        ([], True, "--load: no --load / type=docker yet"),
        (["type=oci,dest=out.tar"], False, "no OCI layout tarball yet"),
        (["type=tar,dest=out.tar"], False, "no filesystem tarball yet"),
        (["type=local,dest=out"], False, "no local filesystem export yet"),
        (["./out"], False, "no local filesystem export yet"),  # buildx's shorthand
        (["type=docker"], False, "no --load / type=docker yet"),
        (["type=s3"], False, "unknown type 's3' (registry, image or none)"),
    ],
)
def test_outputs_not_there_yet_are_refused_naming_why(
    outputs: list[str], load: bool, says: str
) -> None:
    with pytest.raises(OutputError, match=says.replace("(", r"\(").replace(")", r"\)")):
        publishes(outputs, push=False, load=load)
