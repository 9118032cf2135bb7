"""A pretraining corpus from HTML pages (the Python documentation, for the shipped model).

`html_to_text` keeps what a reader of a page reads: paragraphs, headings, list items,
table cells and code blocks (<pre>, whitespace kept verbatim); it drops <head>, scripts,
styles, navigation (<nav>, role="navigation"/"search"/...), forms, permalink anchors and
Sphinx table-of-contents trees, and, when the page marks its main content (<main> or
role="main"), everything outside it. Blocks are joined by a blank line. `build_corpus` reads
every *.html under a directory in sorted path order, so the same pages give the same corpus.
A corpus file is UTF-8 text, documents separated by a line holding only a form feed (\\f, the
ASCII page break); it is also a valid tokenizer training file (blank lines are skipped).

Tested in tests/test_pretrain.py (extraction, corpus files).
"""
from __future__ import annotations

import os
from fnmatch import fnmatch
from html.parser import HTMLParser
from pathlib import Path
from typing import Optional, Sequence, Union

from .files import existing_file, read_text, write_atomic

PathLike = Union[str, os.PathLike]
DOC_SEPARATOR = "\n\f\n"
# Sphinx's generated pages: the general index, module index and search page are lists of names.
DEFAULT_EXCLUDE = ("genindex*.html", "py-modindex.html", "search.html")

SKIP_TAGS = frozenset({"head", "script", "style", "noscript", "template", "nav", "header", "footer", "aside",
                       "form", "button", "select", "textarea", "svg", "iframe"})
SKIP_ROLES = frozenset({"navigation", "search", "banner", "contentinfo"})
SKIP_CLASSES = frozenset({"headerlink", "toctree-wrapper"})  # the "¶" permalinks; Sphinx's link lists
BLOCK_TAGS = frozenset({"address", "article", "blockquote", "br", "caption", "dd", "div", "dl", "dt", "figcaption",
                        "figure", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "li", "main", "ol", "p", "pre",
                        "section", "table", "tbody", "td", "tfoot", "th", "thead", "tr", "ul"})
VOID_TAGS = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
                       "track", "wbr"})


# --- corpus --------------------------------------------------------------------------------
class _TextExtractor(HTMLParser):
    """Collects text blocks as (block, inside the main region). Browsers forgive unclosed tags
    (<p>, <li>), so an end tag closes the nearest open element of its name and everything above."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool, bool]] = []  # (tag, skipped, main)
        self.skip = self.main = self.pre = 0  # how many open elements are skipped / main / <pre>
        self.parts: list[str] = []
        self.blocks: list[tuple[str, bool]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Optional[str]]]) -> None:
        a = dict(attrs)
        if tag in BLOCK_TAGS:
            self._flush()
        if tag in VOID_TAGS:
            return
        skipped = (tag in SKIP_TAGS or a.get("role") in SKIP_ROLES
                   or bool(SKIP_CLASSES & set((a.get("class") or "").split())))
        main = tag == "main" or a.get("role") == "main"
        self.stack.append((tag, skipped, main))
        self.skip, self.main, self.pre = self.skip + skipped, self.main + main, self.pre + (tag == "pre")

    def handle_endtag(self, tag: str) -> None:
        if tag not in (t for t, _, _ in self.stack):
            return
        while self.stack:
            open_tag, skipped, main = self.stack.pop()
            if open_tag in BLOCK_TAGS:
                self._flush()
            self.skip, self.main, self.pre = self.skip - skipped, self.main - main, self.pre - (open_tag == "pre")
            if open_tag == tag:
                return

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.parts.append(data)

    def _flush(self) -> None:
        text = "".join(self.parts)
        self.parts = []
        if self.pre:  # code: keep every line's indentation, drop blank lines at either end; a CR or CR LF line
            # ending is a newline, as an HTML parser's input stream makes it (HTMLParser leaves them)
            lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
            text = "\n".join(line.rstrip() for line in lines).strip("\n")
        else:
            text = " ".join(text.split())
        if text.strip():
            self.blocks.append((text, self.main > 0))


def html_to_text(html: str) -> str:
    """The readable text of one HTML page: its blocks (see the module docstring), joined by "\\n\\n"."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    parser._flush()
    blocks = parser.blocks
    if any(in_main for _, in_main in blocks):
        blocks = [b for b in blocks if b[1]]
    return "\n\n".join(text for text, _ in blocks).replace("\f", "")


def build_corpus(html_dir: PathLike, exclude: Sequence[str] = DEFAULT_EXCLUDE) -> list[str]:
    """One document per *.html file under html_dir (recursively, sorted by relative path), pages
    whose file name matches an `exclude` glob and pages without text left out."""
    root = Path(html_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory; expected a folder of HTML pages")
    files = sorted(p for p in root.rglob("*.html")
                   if p.is_file() and not any(fnmatch(p.name, pattern) for pattern in exclude))
    docs = []
    for f in files:
        text = html_to_text(read_text(f))
        if text:
            docs.append(text)
    if not docs:
        raise ValueError(f"{root}: no *.html page with text (excluding {list(exclude)})")
    return docs


def write_corpus(docs: Sequence[str], path: PathLike) -> None:
    """Write documents to a corpus file (atomically)."""
    write_atomic(Path(path), (DOC_SEPARATOR.join(docs) + "\n").encode("utf-8"))


def read_corpus(path: PathLike) -> list[str]:
    """Documents of a corpus file; a file without form feeds is one document."""
    path = existing_file(path, "expected a UTF-8 corpus file (documents separated by \\f lines)")
    docs = [d.strip("\n") for d in read_text(path).replace("\r\n", "\n").split("\f")]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"{path}: the corpus holds no text")
    return docs
