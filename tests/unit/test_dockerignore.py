"""Each .dockerignore rule, as moby's patternmatcher applies it."""

from __future__ import annotations

import pytest

from polyarch.client.dockerignore import (
    DockerignoreError,
    PatternMatcher,
    clean_pattern,
    parse_dockerignore,
)


def excluded(patterns: list[str], path: str) -> bool:
    return PatternMatcher(patterns).excluded(path)


def test_comments_and_blank_lines_are_ignored() -> None:
    text = "\ufeff# a comment\n\n   \n*.log\n  spaced  \n# another\n"
    assert parse_dockerignore(text) == ["*.log", "spaced"]


def test_a_hash_after_leading_space_is_a_pattern_not_a_comment() -> None:
    # moby checks for "#" before trimming, so " #x" is the pattern "#x".
    assert parse_dockerignore(" #x\n") == ["#x"]


@pytest.mark.parametrize(
    ("raw", "cleaned"),
    [
        ("/foo", "foo"),
        ("./foo/../bar", "bar"),
        ("foo/", "foo"),
        ("foo//bar/.", "foo/bar"),
        ("//abs", "abs"),
        ("/", "/"),
    ],
)
def test_patterns_are_cleaned_and_made_relative(raw: str, cleaned: str) -> None:
    assert clean_pattern(raw) == cleaned


def test_leading_slash_pattern_matches_from_the_context_root() -> None:
    assert excluded(["/secret.txt"], "secret.txt")
    assert not excluded(["/secret.txt"], "sub/secret.txt")


def test_star_matches_within_one_component() -> None:
    assert excluded(["*.md"], "README.md")
    assert not excluded(["*.md"], "docs/guide.md")
    assert excluded(["docs/*.md"], "docs/guide.md")
    assert not excluded(["docs/*.md"], "docs/deep/guide.md")


def test_question_mark_matches_one_character_but_not_a_slash() -> None:
    assert excluded(["file?.txt"], "file1.txt")
    assert not excluded(["file?.txt"], "file10.txt")
    assert not excluded(["a?b"], "a/b")


def test_character_classes_and_ranges() -> None:
    assert excluded(["[a-c].txt"], "b.txt")
    assert not excluded(["[a-c].txt"], "d.txt")
    assert excluded(["[^a].txt"], "z.txt")
    assert not excluded(["[^a].txt"], "a.txt")


def test_double_star_matches_any_number_of_directories() -> None:
    assert excluded(["**/*.go"], "main.go")
    assert excluded(["**/*.go"], "cmd/tool/main.go")
    assert excluded(["a/**/b"], "a/b")
    assert excluded(["a/**/b"], "a/x/y/b")
    assert not excluded(["a/**/b"], "c/a/b")
    assert excluded(["docs/**"], "docs/a/b.txt")


def test_double_star_prefix_with_a_literal_is_a_suffix_match() -> None:
    # moby's suffix shortcut: "**.go" ignores every .go file at any depth.
    assert excluded(["**.go"], "pkg/x.go")
    assert excluded(["**/foo"], "foo")
    assert excluded(["**/foo"], "a/b/foo")


def test_regex_characters_are_literal() -> None:
    assert excluded(["a+b(c){1}|$.txt"], "a+b(c){1}|$.txt")
    assert not excluded(["a.b"], "axb")


def test_backslash_escapes_a_wildcard() -> None:
    assert excluded(["\\*.txt"], "*.txt")
    assert not excluded(["\\*.txt"], "a.txt")


def test_a_matched_directory_excludes_everything_below_it() -> None:
    assert excluded(["build"], "build")
    assert excluded(["build"], "build/out/app.bin")
    assert not excluded(["build"], "src/build.py")
    assert excluded(["*/tmp"], "pkg/tmp/x/y")


def test_exception_re_includes() -> None:
    patterns = ["*.md", "!README.md"]
    assert not excluded(patterns, "README.md")
    assert excluded(patterns, "CHANGES.md")


def test_last_match_wins() -> None:
    assert excluded(["!README.md", "*.md"], "README.md")
    assert not excluded(["*.md", "!README.md"], "README.md")
    assert excluded(["*.md", "!README.md", "README*"], "README.md")


def test_exception_below_an_excluded_directory() -> None:
    patterns = ["build", "!build/keep.txt"]
    assert not excluded(patterns, "build/keep.txt")
    assert excluded(patterns, "build/other.txt")
    assert excluded(patterns, "build")


def test_everything_except_an_allow_list() -> None:
    patterns = ["*", "!src", "!Dockerfile"]
    assert excluded(patterns, "secrets.env")
    assert not excluded(patterns, "src/main.py")
    assert not excluded(patterns, "Dockerfile")


def test_a_bare_exclamation_mark_is_an_error() -> None:
    with pytest.raises(DockerignoreError, match="illegal exclusion pattern"):
        PatternMatcher(["!"])


def test_an_unbalanced_class_is_an_error() -> None:
    with pytest.raises(DockerignoreError, match="syntax error"):
        PatternMatcher(["[abc"])


def test_may_include_below_only_when_an_exception_can_reach_inside() -> None:
    assert PatternMatcher(["build", "!build/keep.txt"]).may_include_below("build")
    assert not PatternMatcher(["build", "!other/keep.txt"]).may_include_below("build")
    assert PatternMatcher(["node_modules", "!**/*.json"]).may_include_below("node_modules")
    assert PatternMatcher(["a", "!a/*/c"]).may_include_below("a/b")
    assert not PatternMatcher(["a", "!a/x/c"]).may_include_below("a/b")
    assert not PatternMatcher(["a", "!a"]).may_include_below("a/b")
    assert not PatternMatcher(["build"]).may_include_below("build")
