"""The docs name only things that exist: every `clipengine ...` line in a code block or inline code
span of README.md and docs/*.md is resolved against the typer app; every relative link and its
#anchor resolves; every `clipengine.…` Python name imports; every repository path exists; and
every `benchmarks/` / `scripts/` call's options are the script's own."""

from __future__ import annotations

import importlib
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


# Links between the pages: a renamed heading or a moved page breaks `[text](page.md#anchor)` silently.
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*$", re.M)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[([^]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_anchor(h) for h in _HEADING.findall(_FENCE.sub("", page.read_text(encoding="utf-8")))}


def _broken_links(page: Path) -> list[str]:
    """Each relative link of `page` whose file is missing, or whose `#anchor` no heading there gives."""
    problems = []
    for target in _LINK.findall(_FENCE.sub("", page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:: not checked offline
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            problems.append(f"{target}: no such file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            problems.append(f"{target}: {linked.name} has no heading with anchor #{anchor}")
    return problems


def test_every_relative_link_and_anchor_resolves() -> None:
    problems = [f"{doc.relative_to(ROOT)}: {p}" for doc in DOCS for p in _broken_links(doc)]
    assert not problems, "\n".join(problems)
    links = sum(len(_LINK.findall(_FENCE.sub("", doc.read_text(encoding="utf-8")))) for doc in DOCS)
    assert links > 15, f"only {links} links found in the docs: is the extraction broken?"


def test_broken_links_reports_a_missing_page_and_a_missing_anchor(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## Offline: placing weights by hand\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#offline-placing-weights-by-hand) [top](#the-page) [web](https://x.org/#y)\n"
        "[gone](missing.md) [stale](other.md#offline) [self](#nowhere)\n\n# The page\n"
        "```\n# not a heading\n[inside a fence](nowhere.md)\n```\n"
    )
    assert [p.split(":")[0] for p in _broken_links(page)] == ["missing.md", "other.md#offline", "#nowhere"]


# Python names the docs give (`clipengine.pipeline.embed_folder(...)`, `from clipengine.serve import
# create_app`): a rename in the code leaves the docs naming something that no longer exists.
_DOTTED = re.compile(r"(?<![\w./-])(clipengine(?:\.[A-Za-z_]\w*)+)")
_FROM_IMPORT = re.compile(r"^\s*from\s+(clipengine[\w.]*)\s+import\s+([\w, ]+)$", re.M)


def _python_names(text: str) -> set[str]:
    """Dotted `clipengine.…` names anywhere in a page, and `from clipengine… import a, b` as module.a, module.b."""
    names = set(_DOTTED.findall(text))
    for module, imported in _FROM_IMPORT.findall(text):
        names.update(f"{module}.{name.strip()}" for name in imported.split(",") if name.strip())
    return names


def _unresolved(dotted: str) -> str | None:
    """None when `dotted` imports (the longest importable module prefix, then attributes), else why not."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for depth, attribute in enumerate(parts[split:], start=split):
            if not hasattr(obj, attribute):
                return f"{'.'.join(parts[:depth])} has no attribute {attribute!r}"
            obj = getattr(obj, attribute)
        return None
    return "no such module"


def test_every_documented_python_name_exists() -> None:
    problems, checked = [], 0
    for doc in DOCS:
        for name in sorted(_python_names(doc.read_text(encoding="utf-8"))):
            checked += 1
            problem = _unresolved(name)
            if problem:
                problems.append(f"{doc.relative_to(ROOT)}: `{name}`: {problem}")
    assert not problems, "\n".join(problems)
    assert checked > 50, f"only {checked} clipengine names found in the docs: is the extraction broken?"


def test_python_names_are_read_from_prose_and_imports_and_checked() -> None:
    text = (
        "Call `clipengine.pipeline.embed_folder(src, out)` or clipengine.load.\n"
        "```python\nfrom clipengine.serve import ServeSettings, no_such_app\n```\n"
        "See src/clipengine/weights/ and `clipengine.index.Index.nonexistent`."
    )
    names = _python_names(text)
    assert names == {
        "clipengine.pipeline.embed_folder",
        "clipengine.load",
        "clipengine.serve",
        "clipengine.serve.ServeSettings",
        "clipengine.serve.no_such_app",
        "clipengine.index.Index.nonexistent",
    }
    assert {n: _unresolved(n) for n in sorted(names) if _unresolved(n)} == {
        "clipengine.index.Index.nonexistent": "clipengine.index.Index has no attribute 'nonexistent'",
        "clipengine.serve.no_such_app": "clipengine.serve has no attribute 'no_such_app'",
    }


# `python benchmarks/x.py --flag` and `scripts/x.py --flag` lines: the script exists and declares
# each flag (argparse `add_argument("--flag"`).
_SCRIPT_CALL = re.compile(r"(?<![\w/.-])((?:benchmarks|scripts)/[\w-]+\.py)((?:[ \t]+[^\s`|#;>]+)*)")


def _script_problems(snippet: str) -> list[str]:
    problems = []
    for script, args in _SCRIPT_CALL.findall(snippet):
        path = ROOT / script
        if not path.is_file():
            problems.append(f"{script}: no such script")
            continue
        source = path.read_text(encoding="utf-8")
        for option in sorted(set(_OPTION.findall(args))):
            if not re.search(rf"""add_argument\(\s*(?:"[^"]*",\s*)*["']{re.escape(option)}["']""", source):
                problems.append(f"{script} has no option {option}")
    return problems


def test_every_documented_script_option_exists() -> None:
    problems, checked = [], 0
    for doc in DOCS:
        for snippet in _code_snippets(doc.read_text(encoding="utf-8")):
            checked += len(_SCRIPT_CALL.findall(snippet))
            problems += [f"{doc.relative_to(ROOT)}: {p}" for p in _script_problems(snippet)]
    assert not problems, "\n".join(problems)
    assert checked > 10, f"only {checked} script calls found in the docs: is the extraction broken?"


def test_script_problems_names_a_missing_script_and_an_unknown_option() -> None:
    snippet = (
        "python benchmarks/index_scale.py --n 20000 --kinds ivf --bogus 3 | tee x; "
        "python benchmarks/gone.py --n 1"
    )
    assert _script_problems(snippet) == [
        "benchmarks/index_scale.py has no option --bogus",
        "benchmarks/gone.py: no such script",
    ]


# Repository paths the docs name (`tests/index/test_search_quality.py`, `benchmarks/e2e_stage_costs.py`,
# `models/pooled.py` inside the package): a moved or renamed file leaves the docs pointing at nothing.
_PACKAGE_DIRS = "models|text|image|backends|export|pipeline|index|eval|bench|serve|distributed|cli|assets"
_REPO_PATH = re.compile(
    rf"(?<![\w./~$<-])((?:src|tests|benchmarks|scripts|docs)/[\w./*-]*[\w/*]"
    rf"|(?:{_PACKAGE_DIRS})/[\w./-]*\.(?:py|json|txt\.gz|txt))"
)


def _missing_paths(text: str, page_dir: Path) -> list[str]:
    """Each path of `text` that is neither in the repository nor (short form) in src/clipengine/."""
    missing = []
    for path in sorted(set(_REPO_PATH.findall(text))):
        roots = (ROOT, ROOT / "src" / "clipengine", page_dir)
        if "*" in path:
            found = any(any(root.glob(path)) for root in roots)
        else:
            found = any((root / path).exists() for root in roots)
        if not found:
            missing.append(path)
    return missing


def test_every_documented_repository_path_exists() -> None:
    problems, checked = [], 0
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        checked += len(_REPO_PATH.findall(text))
        problems += [
            f"{doc.relative_to(ROOT)}: {path}: no such file or folder"
            for path in _missing_paths(text, doc.parent)
        ]
    assert not problems, "\n".join(problems)
    assert checked > 80, f"only {checked} repository paths found in the docs: is the extraction broken?"


def test_missing_paths_reads_repository_and_package_paths() -> None:
    text = (
        "See `tests/test_docs.py`, models/pooled.py, src/clipengine/eval/prompts/*.json and "
        "`benchmarks/gone.py`; `backends/nothing.py` and tests/no_such_dir/. Not paths: "
        "~/tests/x.py, $HOME/docs/y, models/ViT-B-32/ (an export folder named in an example)."
    )
    assert _missing_paths(text, ROOT / "docs") == [
        "backends/nothing.py",
        "benchmarks/gone.py",
        "tests/no_such_dir/",
    ]
