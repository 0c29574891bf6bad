"""The docs stay runnable: links (and their headings) resolve, `make` targets exist, and the named CLI verbs are real.

Reads README.md and docs/*.md. Fast: it parses the Makefile and asks the two argparse parsers for
`VERB --help` in process; nothing of the pipeline runs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+)`")
# `make TARGET` at the start of a command (line start, after a shell separator, or a code span's start).
MAKE = re.compile(r"(?:^|[;&|(]\s*|\s)make\s+([A-Za-z0-9_./-]+)")
# sdxl-lora VERB / sdxl-lora-ops VERB, also as .venv/bin/sdxl-lora...; not sdxl-lora-training and the like.
VERB = re.compile(r"(?:^|(?<=[\s/(`]))(sdxl-lora(?:-ops)?)[ \t]+([a-z][a-z0-9-]*)")


def _code(text: str) -> list[str]:
    """The fenced blocks and inline code spans of a page (fences removed before spans are looked for)."""
    blocks = FENCE.findall(text)
    prose = FENCE.sub("", text)
    return blocks + INLINE.findall(prose)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.*?)\s*$", FENCE.sub("", page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def _relative(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def test_there_are_docs_pages():
    names = {page.name for page in PAGES}
    assert {"README.md", "aws.md", "training-job.md", "dags.md", "development.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=_relative)
def test_relative_links_resolve_inside_the_repository(page):
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, mailto:
            continue
        if target.startswith("#"):
            if target[1:] not in _anchors(page):
                broken.append(f"{target} (no such heading)")
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.is_relative_to(ROOT):
            broken.append(f"{target} (outside the repository)")
        elif not path.exists():
            broken.append(target)
        elif "#" in target and path.suffix == ".md" and target.split("#", 1)[1] not in _anchors(path):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{_relative(page)}: links that do not resolve: {broken}"


def test_the_readme_links_nowhere_outside_the_repository():
    external = [t for t in LINK.findall((ROOT / "README.md").read_text()) if re.match(r"[a-z][a-z0-9+.-]*:", t)]
    assert not external, external


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    variables = dict(re.findall(r"^([A-Z_]+)\s*[:?]?=\s*(.*?)\s*$", text, re.M))

    def expand(value: str) -> str:
        for _ in range(5):
            value = re.sub(r"\$\(([A-Z_]+)\)", lambda m: variables.get(m.group(1), m.group(0)), value)
        return value

    targets = set()
    for line in text.splitlines():
        match = re.match(r"^([^\s:=#][^:=]*?)\s*:(?!=)", line)
        if match:
            targets.update(expand(match.group(1)).split())
    return targets - {".PHONY"}


def test_every_make_target_named_in_the_docs_exists():
    targets = _make_targets()
    assert {"demo", "test"} <= targets
    missing = {}
    for page in PAGES:
        for code in _code(page.read_text()):
            for target in MAKE.findall(code):
                if "=" not in target and target not in targets:
                    missing.setdefault(_relative(page), set()).add(target)
    assert not missing, f"make targets the Makefile lacks: {missing}"


def _ops_parser() -> argparse.ArgumentParser:
    from sdxl_lora_ops.cli import build_parser

    return build_parser()


def _payload_parser() -> argparse.ArgumentParser:
    from ml.cli import build_parser

    return build_parser()


PARSERS = {"sdxl-lora": _payload_parser, "sdxl-lora-ops": _ops_parser}


def _verbs_in_docs() -> dict[tuple[str, str], set[str]]:
    found: dict[tuple[str, str], set[str]] = {}
    for page in PAGES:
        for code in _code(page.read_text()):
            for program, verb in VERB.findall(code):
                found.setdefault((program, verb), set()).add(_relative(page))
    return found


def test_the_docs_name_the_verbs_of_both_tools():
    programs = {program for program, _ in _verbs_in_docs()}
    assert programs == set(PARSERS)


@pytest.mark.parametrize("program", sorted(PARSERS))
def test_every_verb_named_in_a_docs_code_block_is_a_subcommand(program):
    parser = PARSERS[program]()
    assert parser.prog == program
    unknown = {}
    for (named, verb), pages in sorted(_verbs_in_docs().items()):
        if named != program:
            continue
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_:
            parser.parse_args([verb, "--help"])
        if exit_.value.code != 0 or f"{program} {verb}" not in out.getvalue():
            unknown[verb] = sorted(pages)
    assert not unknown, f"`{program}` has no such subcommand: {unknown}"
