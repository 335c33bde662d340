"""The repository explains itself (issue 9): every relative link in its Markdown resolves,
to a file and to a heading; every document a comment, a docstring or a page cites by a
`.md` name is in the repository, and so is the section the citation names; and the index
of docs/ lists every page in it. And the example configuration shows every key with its
default, and says "not used yet" of exactly the keys nothing reads.

Plain file reads, no network, no git: what is checked is the tree on disk, as a reader of
a checkout sees it. Headings are matched by GitHub's anchor rules (`anchor`).
"""

from __future__ import annotations

import ast
import io
import os
import re
import tokenize
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent
# Not the repository's own text (with every hidden directory but .ci: .git, .venv, caches).
PRUNED = {"__pycache__", "node_modules", "build", "dist"}
PRUNED_PATHS = {ROOT / "bench" / "out"}
# Where comments and docstrings are read, besides every Markdown file.
CODE_PLACES = ("daemon", "tests", "bench", "config", "systemd", "deploy", ".ci",
               "pyproject.toml", "Makefile")
TEXT_SUFFIXES = {".py", ".c", ".lua", ".toml", ".json", ".cfg", ".conf", ".service",
                 ".socket", ".txt", ""}

CONFIG = ROOT / "config" / "msgledger.toml"
CONFIG_KEY = re.compile(r"^(#\s*)?([a-z_]+) = (.*)$")  # a key, or a commented-out example
NOT_YET = "not used yet"  # what the comment of a key that nothing reads must say

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
HTML_ANCHOR = re.compile(r"""<a\s[^>]*?(?:name|id)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
INLINE_LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]"  # [text], nested [] allowed
                         r"\(\s*(<[^>]*>|[^\s)]*)(?:\s+[\"'(][^)]*)?\)")  # (target "title")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
SCHEME = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.-]*:|//)")
URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s)>\]\"'`]+")
# A document cited by name, such as docs/twilio.md or ../bench/README.md.
CITED = re.compile(r"(?<![\w/.-])((?:\.{1,2}/)*(?:[\w.-]+/)*[\w-][\w.-]*\.md)(?![\w/-])")
# What may follow a citation to name its section: #anchor, "Heading text", §7.
SECTION = re.compile(r"#([\w-]+)"  # as in docs/design.md#status-rules
                     r"|(?:\s*[,:]\s*|[ \t]+)\(?[\"\u201c]([^\"\u201d]{1,120})[\"\u201d]"  # "Title"
                     r"|\s*§\s*(\d+(?:\.\d+)*)")  # §7


@dataclass(frozen=True)
class Offence:
    path: Path
    line: int
    what: str
    text: str

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.what}\n      {self.text.strip()}"


# ---------------------------------------------------------------- the tree


def walk(*places: str) -> Iterator[Path]:
    """The files under `places` (all of the tree by default), pruned as above, sorted."""
    for place in places or (".",):
        start = (ROOT / place).resolve()
        if start.is_file():
            yield start
            continue
        for folder, dirs, files in os.walk(start):
            here = Path(folder)
            dirs[:] = sorted(d for d in dirs if not _pruned(here / d, d))
            yield from (here / f for f in sorted(files))


def _pruned(path: Path, name: str) -> bool:
    return (name.startswith(".") and path != ROOT / ".ci") or name in PRUNED \
        or name.endswith(".egg-info") or path in PRUNED_PATHS


def markdown_files() -> list[Path]:
    return [p for p in walk() if p.suffix == ".md"]


# ---------------------------------------------------------------- Markdown


def prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        opening = FENCE.match(line)
        if fence is None and opening:
            fence = opening.group(1)
        elif fence is not None:
            if opening and opening.group(1)[0] == fence[0] and len(opening.group(1)) >= len(fence) \
                    and not line.strip()[len(opening.group(1)):].strip():
                fence = None
        else:
            yield number, line


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading's text: the rendered text (code spans' content, link
    text, no emphasis markers or HTML), lower case, every character but letters, digits,
    spaces, hyphens and underscores dropped, each space a hyphen."""
    parts = []
    for n, part in enumerate(CODE_SPAN.split(heading)):
        if n % 3 == 2:  # a code span's content, verbatim
            parts.append(part)
        elif n % 3 == 0:  # text around code spans: links, HTML and emphasis rendered away
            part = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", part)
            part = re.sub(r"<[^>]+>", "", part).replace("*", "").replace("~~", "")
            parts.append(re.sub(r"(?<!\w)_+|_+(?!\w)", "", part))
    text = "".join(parts).strip().lower()
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


@cache
def headings(path: Path) -> tuple[tuple[str, ...], frozenset[str]]:
    """A Markdown file's heading texts, in order, and every anchor a link may name in it
    (duplicates numbered -1, -2 as GitHub does; explicit <a name> and id anchors too)."""
    texts: list[str] = []
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    previous = ""
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        found = None
        atx = ATX.match(line)
        if atx:
            found = atx.group(2) or ""
        elif SETEXT.match(line) and previous.strip() and not ATX.match(previous) \
                and not re.match(r"^\s*([-*+>|]|\d+[.)])", previous):
            found = previous.strip()
        if found is not None:
            texts.append(found)
            slug = anchor(found)
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
        anchors.update(HTML_ANCHOR.findall(line))
        previous = line
    return tuple(texts), frozenset(anchors)


def link_targets(text: str) -> Iterator[tuple[int, str, str]]:
    """(line, target, the line) of every inline link, image and reference definition in
    the prose; code spans and fenced code are not links."""
    for number, line in prose_lines(text):
        bare = CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)
        for match in INLINE_LINK.finditer(bare):
            yield number, match.group(2).strip("<>"), line
        definition = REFERENCE_DEF.match(bare)
        if definition:
            yield number, definition.group(1).strip("<>"), line


def link_problem(source: Path, target: str) -> str | None:
    """Why `target`, a link in `source`, does not resolve; None if it does (or is not a
    relative link)."""
    if not target or SCHEME.match(target):
        return None
    path_part, _, fragment = target.partition("#")
    path_part = unquote(path_part)
    if path_part.startswith("/"):
        resolved = ROOT / path_part.lstrip("/")
    else:
        resolved = (source.parent / path_part) if path_part else source
    if not resolved.exists():
        return f"links to {target}: no such file"
    if fragment and resolved.suffix == ".md" and resolved.is_file() \
            and unquote(fragment) not in headings(resolved.resolve())[1]:
        return f"links to {target}: {resolved.name} has no heading with the anchor #{fragment}"
    return None


# ---------------------------------------------------------------- citations


def cited_texts(path: Path) -> Iterator[tuple[int, str]]:
    """(first line, text) of what may cite a document: a Python file's comments (each run
    of comment lines as one text) and docstrings; a Markdown file's prose, link targets
    left out (the link check reads those); any other text file whole."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".py":
        yield from _python_texts(text)
    elif path.suffix == ".md":
        for number, line in prose_lines(text):
            yield number, INLINE_LINK.sub(lambda m: "[" + m.group(1) + "]", line)
    else:
        yield 1, text


def _python_texts(source: str) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) \
                and isinstance(node.value.value, str):
            yield node.lineno, node.value.value
    run: list[str] = []
    start = last = 0
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.COMMENT:
            continue
        line = token.start[0]
        if run and line != last + 1:
            yield start, "\n".join(run)
            run = []
        if not run:
            start = line
        run.append(token.string.lstrip("#"))
        last = line
    if run:
        yield start, "\n".join(run)


def resolve_cited(name: str, citing: Path) -> Path | None:
    """The file a cited name means: beside the citing file, or from the repository's root."""
    for base in (citing.parent, ROOT):
        candidate = (base / name).resolve()
        if candidate.is_file():
            return candidate
    return None


def section_problem(document: Path, after: str) -> str | None:
    """Why the section named right after a citation of `document` is not in it (None if
    it is, or if no section is named). `after` is the text that follows the name."""
    match = SECTION.match(after)
    if match is None or document.suffix != ".md":
        return None
    texts, anchors = headings(document)
    fragment, quoted, number = match.groups()
    if fragment is not None:
        return None if fragment in anchors else f"#{fragment}"
    if quoted is not None:
        wanted = " ".join(quoted.split()).lower().replace("`", "")
        found = any(wanted in " ".join(t.split()).lower().replace("`", "") for t in texts)
        return None if found else f'"{quoted}"'
    ok = any(re.match(rf"{re.escape(number)}[.\s)]", t.strip()) for t in texts)
    return None if ok else f"§{number}"


def citation_offences(path: Path) -> Iterator[Offence]:
    for first, text in cited_texts(path):
        clean = URL.sub(lambda m: " " * len(m.group(0)), text)
        for match in CITED.finditer(clean):
            line = first + clean.count("\n", 0, match.start())
            quoted = text.splitlines()[line - first] if "\n" in text else text
            document = resolve_cited(match.group(1), path)
            if document is None:
                yield Offence(path, line, f"cites {match.group(1)}, which is not in the "
                              "repository", quoted)
                continue
            missing = section_problem(document, clean[match.end():match.end() + 300])
            if missing is not None:
                yield Offence(path, line, f"cites {match.group(1)} {missing}, which it has no "
                              "heading for", quoted)


def citing_files() -> list[Path]:
    code = [p for p in walk(*CODE_PLACES) if p.suffix in TEXT_SUFFIXES and p.suffix != ".md"]
    return sorted({*code, *markdown_files()})


def report(offences: list[Offence], what: str) -> str:
    return f"{len(offences)} {what}:\n" + "\n".join(f"  {o}" for o in offences)


# ---------------------------------------------------------------- the example config


def documented_keys() -> dict[tuple[str, str], tuple[str, bool]]:
    """(section, key) -> (the comment just above it, whether it is a commented-out example)."""
    section, comment, found = "", list[str](), {}
    for line in CONFIG.read_text(encoding="utf-8").splitlines():
        header = re.match(r"^\[(\w+)\]\s*$", line)
        key = CONFIG_KEY.match(line)
        if header:
            section, comment = header.group(1), []
        elif key:
            found[(section, key.group(2))] = (" ".join(comment), key.group(1) is not None)
            comment = []
        elif line.startswith("#"):
            comment.append(line.lstrip("#").strip())
    return found


@cache
def daemon_code() -> str:
    """Every Python file of daemon/ but settings.py (which defines every attribute)."""
    return "\n".join(path.read_text(encoding="utf-8") for path in walk("daemon")
                     if path.suffix == ".py" and path.name != "settings.py")


def daemon_reads(attribute: str) -> bool:
    """Whether code in daemon/ uses the Settings attribute `attribute`."""
    return re.search(rf"\b{attribute}\b", daemon_code()) is not None


# ---------------------------------------------------------------- the tests


def test_anchors_follow_githubs_rules() -> None:
    """Headings become the anchors GitHub gives them: the link check is only as good as
    this."""
    assert anchor("Host case: the signature is over the URL as typed in Twilio") == \
        "host-case-the-signature-is-over-the-url-as-typed-in-twilio"
    assert anchor("3. `Expect: 100-continue`, an early answer: BusyResourceError") == \
        "3-expect-100-continue-an-early-answer-busyresourceerror"
    assert anchor("bench/handoff.py: what handing one event costs") == \
        "benchhandoffpy-what-handing-one-event-costs"
    assert anchor("The `store/_fold.py` rules, *emphasised* and [linked](x.md)") == \
        "the-store_foldpy-rules-emphasised-and-linked"
    assert anchor("Rate limits and 429") == "rate-limits-and-429"


def test_every_relative_link_resolves() -> None:
    """Every relative link in every Markdown file of the repository names a file that
    exists, and a #fragment names a heading of that file."""
    offences = [Offence(md, line, problem, text)
                for md in markdown_files()
                for line, target, text in link_targets(md.read_text(encoding="utf-8"))
                if (problem := link_problem(md, target)) is not None]
    assert not offences, report(offences, "links that do not resolve")


def test_every_cited_document_is_in_the_repository() -> None:
    """A comment, docstring or page that cites a document by its .md name cites one in the
    repository, and the section it names (#anchor, "Heading", §N) is a heading there."""
    offences = sorted((o for path in citing_files() for o in citation_offences(path)),
                      key=lambda o: (o.path, o.line))
    assert not offences, report(offences, "citations of documents the repository lacks")


def test_the_docs_index_lists_every_page() -> None:
    """docs/README.md links every other page in docs/."""
    index = ROOT / "docs" / "README.md"
    linked = {(index.parent / target.partition("#")[0]).resolve()
              for _, target, _ in link_targets(index.read_text(encoding="utf-8"))
              if not SCHEME.match(target)}
    pages = {p.resolve() for p in (ROOT / "docs").glob("*.md") if p.name != "README.md"}
    missing = sorted(p.name for p in pages - linked)
    assert not missing, f"docs/README.md does not list {missing}"


def test_the_example_config_documents_every_key_as_it_works() -> None:
    """config/msgledger.toml shows every key settings.py accepts, each set to its default
    (or, for a key unset by default, as a commented-out example), and a key's comment says
    "not used yet" exactly when nothing in daemon/ reads its Settings attribute."""
    from msgledger import settings

    documented = documented_keys()
    accepted = {(section, key) for section, keys in settings.SCHEMA.items() for key in keys}
    assert set(documented) == accepted, (
        f"not in the example: {sorted(accepted - set(documented))};"
        f" not accepted: {sorted(set(documented) - accepted)}")
    values = tomllib.loads(CONFIG.read_text(encoding="utf-8"))
    problems = []
    for (section, key), (comment, example) in sorted(documented.items()):
        parse, default = settings.SCHEMA[section][key]
        name = f"{section}.{key}"
        if example and default not in (None, []):
            problems.append(f"{name}: commented out, but its default is {default!r}")
        if not example and parse(values[section][key]) != parse(default):
            problems.append(f"{name}: set to {values[section][key]!r}, not its default {default!r}")
        attributes = (["http_listen_host", "http_listen_port"] if name == "http.listen"
                      else [f"{section}_{key}"])
        read = any(daemon_reads(a) for a in attributes)
        if read and NOT_YET in comment.lower():
            problems.append(f"{name}: says {NOT_YET!r}, but daemon/ reads settings.{attributes[0]}")
        if not read and NOT_YET not in comment.lower():
            problems.append(f"{name}: documented as working, but nothing in daemon/ reads"
                            f" settings.{attributes[0]}; say {NOT_YET!r} in its comment")
    assert not problems, "config/msgledger.toml:\n  " + "\n  ".join(problems)
