"""The docs name only CLI commands and options that exist: every `clipengine ...` line in a code block
or inline code span of README.md and docs/*.md is resolved against the typer app."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer.main

from clipengine.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_INLINE = re.compile(r"`([^`\n]+)`")
_COMMAND = re.compile(r"(?<![\w./-])clipengine((?:[ \t]+[^\s]+)*)")
_OPTION = re.compile(r"(?<![\w/.-])(--?[A-Za-z][\w-]*)")
_GLOBAL = {"-v", "--verbose", "--help"}
_ELLIPSIS = {"…", "..."}  # `clipengine -v …`: any command
_SHELL = {"bash", "sh", "shell", "console", ""}


def _code_snippets(text: str) -> list[str]:
    """Shell lines of fenced blocks (continuations joined) and inline code spans outside them."""
    snippets: list[str] = []
    for lang, body in _FENCE.findall(text):
        if lang in _SHELL:
            lines = re.sub(r"\\\n[ \t]*", " ", body).splitlines()
            snippets += [re.split(r"(?:^|\s)#", line)[0] for line in lines]  # comments are prose
    snippets += _INLINE.findall(_FENCE.sub("", text))
    return snippets


def _invocations(snippet: str) -> list[list[str]]:
    """The words of each `clipengine` call in a snippet, up to a comment, pipe, redirect or backtick."""
    calls = []
    for match in _COMMAND.finditer(snippet):
        rest = re.split(r"\s#|[|;`>]|&&|\(|\)", match.group(1))[0]
        calls.append(rest.split())
    return calls


def _check(words: list[str], root: Any) -> str | None:
    """None when `clipengine WORDS` names a real command and only options it has, else the problem."""
    command, path = root, ["clipengine"]
    words = [w for w in words if w not in _GLOBAL]
    while hasattr(command, "commands"):
        if not words:  # a group named alone (`clipengine eval`): fine in prose
            return None
        name = words.pop(0)
        if name in _ELLIPSIS:
            return None
        if name not in command.commands:
            return f"{' '.join(path)} has no command {name!r} (has: {', '.join(sorted(command.commands))})"
        command, path = command.commands[name], [*path, name]
    known = set(_GLOBAL)
    for param in command.params:
        known.update(param.opts, param.secondary_opts)
    unknown = sorted({o for w in words for o in _OPTION.findall(w.split("=")[0]) if o not in known})
    if unknown:
        return f"{' '.join(path)} has no option {', '.join(unknown)}"
    return None


@pytest.fixture(scope="module")
def cli() -> Any:
    return typer.main.get_command(app)


def test_every_documented_command_and_option_exists(cli: Any) -> None:
    problems, checked = [], 0
    for doc in DOCS:
        for snippet in _code_snippets(doc.read_text(encoding="utf-8")):
            for words in _invocations(snippet):
                checked += 1
                problem = _check(words, cli)
                if problem:
                    problems.append(f"{doc.relative_to(ROOT)}: `clipengine {' '.join(words)}`: {problem}")
    assert not problems, "\n".join(problems)
    assert checked > 80, f"only {checked} clipengine calls found in the docs: is the extraction broken?"


def _leaf_commands(command: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    subs = getattr(command, "commands", None)
    if not subs:
        return [path]
    return [leaf for name, sub in sorted(subs.items()) for leaf in _leaf_commands(sub, (*path, name))]


def test_every_cli_command_is_shown_in_the_docs(cli: Any) -> None:
    shown = {
        tuple(w for w in words if w not in _GLOBAL)
        for doc in DOCS
        for snippet in _code_snippets(doc.read_text(encoding="utf-8"))
        for words in _invocations(snippet)
    }
    leaves = _leaf_commands(cli)
    missing = [" ".join(leaf) for leaf in leaves if not any(words[: len(leaf)] == leaf for words in shown)]
    assert not missing, f"commands with no example in README.md or docs/*.md: {missing}"


@pytest.mark.parametrize(
    ("snippet", "problem"),
    [
        ("clipengine embed photos/ -o out --no-such-flag", "clipengine embed has no option --no-such-flag"),
        (
            "clipengine index remove photos.index",
            "clipengine index has no command 'remove' (has: add, build, info)",
        ),
        ("clipengine serve --index=x --bogus=1 # --ignored", "clipengine serve has no option --bogus"),
        ("clipengine search x.index 'a dog' -q 3 | head", "clipengine search has no option -q"),
    ],
)
def test_check_reports_unknown_commands_and_options(cli: Any, snippet: str, problem: str) -> None:
    [words] = _invocations(snippet)
    assert _check(words, cli) == problem


def test_check_accepts_real_calls_and_reads_continued_fenced_lines(cli: Any) -> None:
    text = (
        "Run `clipengine -v embed d -o o --no-progress`.\n\n```bash\n"
        "clipengine export ViT-B-32 -o m/ --precision fp32 \\\n    --image-batch 1,8 [--dynamic]\n```\n"
        "```python\nimport clipengine\n```\n"
    )
    calls = [words for s in _code_snippets(text) for words in _invocations(s)]
    assert calls == [
        ["export", "ViT-B-32", "-o", "m/", "--precision", "fp32", "--image-batch", "1,8", "[--dynamic]"],
        ["-v", "embed", "d", "-o", "o", "--no-progress"],
    ]
    assert [_check(words, cli) for words in calls] == [None, None]
