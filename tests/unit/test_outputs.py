"""--output and --load as buildx spells them: what publishes, what is written, what is refused."""

from __future__ import annotations

import pytest

from polyarch.client.outputs import Export, OutputError, docker_platform, plan_outputs


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
        (["type=oci,dest=out.tar"], False, False),  # an explicit output replaces the push
        (["type=oci,dest=out.tar"], True, True),
        (["type=local,dest=out", "type=registry"], False, True),
    ],
)
def test_which_outputs_publish(outputs: list[str], push: bool, expected: bool) -> None:
    assert plan_outputs(outputs, push, load=False).publish is expected


@pytest.mark.parametrize(
    ("outputs", "load", "exports"),
    [
        ([], True, [Export("docker", "")]),  # --load is type=docker without dest
        (["type=docker"], False, [Export("docker", "")]),
        (["type=docker,dest=img.tar"], False, [Export("docker", "img.tar")]),
        (["type=oci,dest=-"], False, [Export("oci", "-")]),
        (["type=tar,dest=fs.tar"], False, [Export("tar", "fs.tar")]),
        (["./out"], False, [Export("local", "./out")]),  # buildx's shorthand for type=local
        (["-"], False, [Export("tar", "-")]),  # and for a tar on stdout
        (["type=local,dest=a", "type=oci,dest=b"], True,
         [Export("docker", ""), Export("local", "a"), Export("oci", "b")]),
    ],
)  # fmt: skip
def test_file_outputs_are_planned_with_their_destinations(
    outputs: list[str], load: bool, exports: list[Export]
) -> None:
    plan = plan_outputs(outputs, push=False, load=load)
    assert list(plan.exports) == exports
    assert not plan.publish
    assert plan.to_stdout == any(e.dest == "-" for e in exports)


@pytest.mark.parametrize(
    ("outputs", "load", "says"),
    [
        (["type=oci"], False, "type=oci needs dest=FILE"),
        (["type=tar"], False, "type=tar needs dest=FILE"),
        (["type=local"], False, "type=local needs dest=DIR"),
        (["type=local,dest=-"], False, "type=local needs a folder; use type=tar"),
        (["type=oci,dest=-", "-"], False, "only one --output can write to stdout"),
        (["type=docker"], True, "both load into Docker"),
        (["type=cacheonly"], False, "type=cacheonly is not supported"),
        (["dest=out"], False, "type is required"),
        (["type=s3"], False, "unknown type 's3' (registry, image, none, oci, docker, tar or"),
    ],
)
def test_outputs_that_cannot_work_are_refused_naming_why(
    outputs: list[str], load: bool, says: str
) -> None:
    with pytest.raises(OutputError, match=says.replace("(", r"\(").replace(")", r"\)")):
        plan_outputs(outputs, push=False, load=load)


def test_a_docker_archive_takes_the_only_platform_or_the_local_one() -> None:
    assert docker_platform(["linux/arm64"], "linux/amd64") == "linux/arm64"
    assert docker_platform(["linux/arm64", "linux/amd64"], "linux/amd64") == "linux/amd64"
    with pytest.raises(OutputError, match="none is the local one \\(linux/amd64\\)"):
        docker_platform(["linux/arm64", "linux/arm/v7"], "linux/amd64")
