"""Embedded English Wikipedia text: calibration, validation and held-out splits.

The ``gensim`` wheel ships, as test data, a shortened English Wikipedia dump
(``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``, about a
hundred articles in MediaWiki XML export format).  This module finds that file
without importing gensim (gensim only needs to be *installed*, with
``pip install --no-deps gensim``), stream-parses it, turns the wiki markup into
plain English prose and splits the articles deterministically into:

* ``"calibration"`` (~70% of the articles): activations for the compression,
* ``"validation"`` (~10%): a slice of the calibration side kept apart for tuning
  hyperparameters,
* ``"heldout"`` (~20%): perplexity evaluation only.

The split is by article (never inside one), decided by the SHA-256 of the title,
so it is the same on every machine and Python version.

Public API: :class:`Article`, :func:`embedded_dump_path`, :func:`read_articles`,
:func:`strip_wikitext`, :func:`split_articles`, :func:`embedded_text`,
:func:`embedded_articles`, :data:`SPLITS`.
"""

from __future__ import annotations

import bz2
import dataclasses
import functools
import hashlib
import html
import importlib.metadata
import importlib.util
import pathlib
import re
import xml.etree.ElementTree as ET
from typing import IO, Iterable, Iterator

from modegpt_jax.errors import UserError

__all__ = [
    "Article",
    "SPLITS",
    "INSTALL_COMMAND",
    "MIN_ARTICLE_CHARS",
    "embedded_dump_path",
    "read_articles",
    "strip_wikitext",
    "split_articles",
    "embedded_text",
    "embedded_articles",
]

#: Location of the dump inside the gensim distribution (relative to site-packages).
DUMP_RELPATH = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
INSTALL_COMMAND = "pip install --no-deps gensim"

#: Split names, in order, with their share of the articles.
SPLITS: tuple[str, ...] = ("calibration", "validation", "heldout")
SPLIT_FRACTIONS: dict[str, float] = {"calibration": 0.7, "validation": 0.1, "heldout": 0.2}

#: Articles with fewer characters than this after stripping are dropped.
MIN_ARTICLE_CHARS = 200


@dataclasses.dataclass(frozen=True)
class Article:
    """One Wikipedia article as plain text (headings on their own lines, paragraphs separated by a blank line)."""

    title: str
    text: str


# --------------------------------------------------------------------------- locating the dump


def _locate_via_metadata(relpath: str) -> pathlib.Path | None:
    try:
        dist = importlib.metadata.distribution("gensim")
    except importlib.metadata.PackageNotFoundError:
        return None
    return pathlib.Path(str(dist.locate_file(relpath)))


def _locate_via_spec(relpath: str) -> pathlib.Path | None:
    # find_spec on a top-level name locates the package without executing it.
    try:
        spec = importlib.util.find_spec("gensim")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    inner = relpath.split("/", 1)[1]
    for location in spec.submodule_search_locations:
        candidate = pathlib.Path(location) / inner
        if candidate.is_file():
            return candidate
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / inner


def embedded_dump_path() -> pathlib.Path:
    """Path of the Wikipedia sample dump shipped in the installed gensim wheel (gensim is not imported).

    Raises :class:`UserError` naming the install command if gensim or the file is missing.
    """
    candidates = [p for p in (_locate_via_metadata(DUMP_RELPATH), _locate_via_spec(DUMP_RELPATH)) if p is not None]
    for path in candidates:
        if path.is_file():
            return path
    if not candidates:
        raise UserError(
            "the embedded Wikipedia sample comes from the gensim package, which is not installed; "
            f"install it with: {INSTALL_COMMAND}"
        )
    raise UserError(
        f"gensim is installed but its Wikipedia sample {candidates[0]} is missing; "
        f"reinstall it with: {INSTALL_COMMAND} --force-reinstall"
    )


# --------------------------------------------------------------------------- reading the XML dump


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child(elem: ET.Element, name: str) -> ET.Element | None:
    for child in elem:
        if _local(child.tag) == name:
            return child
    return None


def _open_dump(path: pathlib.Path) -> IO[bytes]:
    with open(path, "rb") as fh:
        magic = fh.read(3)
    return bz2.open(path, "rb") if magic == b"BZh" else open(path, "rb")


def _iter_pages(path: pathlib.Path) -> Iterator[tuple[str, int, bool, str]]:
    """Yield (title, namespace, is_redirect, wikitext) per <page>, streaming, namespace-agnostic."""
    with _open_dump(path) as fh:
        root = None
        for event, elem in ET.iterparse(fh, events=("start", "end")):
            if event == "start":
                if root is None:
                    root = elem
                continue
            if _local(elem.tag) != "page":
                continue
            title_el, ns_el = _child(elem, "title"), _child(elem, "ns")
            title = (title_el.text or "").strip() if title_el is not None else ""
            try:
                ns = int((ns_el.text or "0").strip()) if ns_el is not None else 0
            except ValueError:
                ns = -1
            redirect = _child(elem, "redirect") is not None
            text = ""
            for rev in elem:
                if _local(rev.tag) == "revision":
                    text_el = _child(rev, "text")
                    if text_el is not None and text_el.text:
                        text = text_el.text  # the last revision wins
            yield title, ns, redirect, text
            elem.clear()
            if root is not None:
                root.clear()  # drop the finished pages


_REDIRECT_TEXT = re.compile(r"^\s*#redirect", re.IGNORECASE)


def read_articles(path: str | pathlib.Path) -> list[Article]:
    """Parse a MediaWiki XML dump (bz2 or plain) into plain-text articles, in dump order.

    Redirects, pages outside the main namespace (ns != 0) and articles with fewer than
    :data:`MIN_ARTICLE_CHARS` characters after stripping are skipped.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"Wikipedia dump not found: {path}")
    articles: list[Article] = []
    seen: set[str] = set()
    try:
        for title, ns, redirect, wikitext in _iter_pages(path):
            if ns != 0 or redirect or not title or _REDIRECT_TEXT.match(wikitext) or title in seen:
                continue
            text = strip_wikitext(wikitext)
            if len(text) < MIN_ARTICLE_CHARS:
                continue
            seen.add(title)
            articles.append(Article(title=title, text=text))
    except (ET.ParseError, OSError, EOFError) as exc:
        raise UserError(f"cannot read Wikipedia dump {path}: {exc}") from exc
    return articles


# --------------------------------------------------------------------------- wiki markup -> plain text

_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.DOTALL)
_REF_SELF = re.compile(r"<ref\b[^<>]*?/\s*>", re.IGNORECASE)
_REF_PAIR = re.compile(r"<ref\b[^<>]*>.*?</ref\s*>", re.IGNORECASE | re.DOTALL)
# Tags whose whole content is dropped (not prose: formulas, code, galleries, reference lists...).
_DROP_TAGS = (
    "ref|references|math|chem|ce|gallery|timeline|imagemap|score|syntaxhighlight|source|pre|graph|"
    "mapframe|maplink|hiero|templatedata|includeonly|inputbox|categorytree"
)
_DROP_PAIR = re.compile(rf"<({_DROP_TAGS})\b[^<>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_DROP_SELF = re.compile(rf"<(?:{_DROP_TAGS})\b[^<>]*/\s*>", re.IGNORECASE)
_BR = re.compile(r"<br\s*/?\s*>|</?(?:p|li|div|blockquote|poem|center|dd|dt|tr)\b[^<>]*>", re.IGNORECASE)
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*\b[^<>]*?/?>")

_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$")
# Trailing sections made of these words are reference lists / link lists, not prose.
_APPENDIX_PART = (
    r"(?:(?:general |selected |primary |secondary |other |further |external |additional )?"
    r"(?:references?|notes?|footnotes|citations|sources|bibliography|reading|links?|literature|"
    r"works cited|reference literature|see also))"
)
_APPENDIX_HEADING = re.compile(rf"^{_APPENDIX_PART}(?:\s*(?:,|and|&)\s*{_APPENDIX_PART})*$")

_TOKENS_BRACES = re.compile(r"\{\{|\}\}|^[ \t:]*\{\||^[ \t]*\|\}", re.MULTILINE)
_TOKENS_LINKS = re.compile(r"\[\[|\]\]")
_EXTERNAL = re.compile(r"\[(?:https?:|ftp:|mailto:|//)[^\s\]]*(?:[ \t]+([^\]\n]*))?\]", re.IGNORECASE)
_BARE_URL = re.compile(r"\b(?:https?|ftp)://[^\s<>\]]+", re.IGNORECASE)
_QUOTES = re.compile(r"'{2,}")
_MAGIC = re.compile(r"__[A-Z]+__")
_LIST_MARK = re.compile(r"^[*#:;]+\s*")
_NAMED_ARG = re.compile(r"^\s*[\w .-]+\s*=")

# Link prefixes whose links are not shown as text (images, categories, interlanguage links).
_HIDDEN_LINK_NS = {"file", "image", "category", "media"}
# Interwiki / project prefixes: show the label, or the page name after the prefix.
_INTERWIKI = {
    "wikt", "wiktionary", "s", "wikisource", "q", "wikiquote", "commons", "b", "wikibooks", "n",
    "wikinews", "v", "wikiversity", "voy", "wikivoyage", "species", "wikispecies", "d", "wikidata",
    "meta", "m", "mw", "w", "wikipedia", "wp", "portal", "help", "template", "user", "special", "talk",
}  # fmt: skip
_LANG_CODE = re.compile(r"^[a-z]{2,3}(?:-[a-z]{2,8})*$")

# Inline formatting templates whose visible text is worth keeping; every other template is dropped.
_KEEP_LAST_ARG = {
    "lang", "transl", "nowrap", "nobr", "nowr", "small", "smaller", "big", "larger", "em", "strong",
    "sic", "math", "mvar", "var", "angbr", "nts", "ntsh", "not a typo", "proper name", "as written",
    "serif", "sans-serif", "resize", "script",
}  # fmt: skip  (and every "lang-xx")
_KEEP_FIRST_ARG = {"nihongo", "vanchor", "visible anchor", "ill", "abbr", "quote", "quotation", "val", "keypress"}
_LITERAL_TEMPLATES = {
    "nbsp": " ", "=": "=", "ndash": "–", "mdash": "—", "snd": " – ", "spaced ndash": " – ",
    "spnd": " – ", "'s": "'s", "'": "'", "·": " · ", "dot": " · ", "middot": "·",
}  # fmt: skip
_RANGE_WORDS = {"-", "–", "to", "and", "or", "x", "by", "+/-", "±"}


def _split_top_level(inner: str, sep: str = "|") -> list[str]:
    """Split template arguments on ``sep`` outside nested [[...]] / {{...}}."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(inner):
        two = inner[i : i + 2]
        if two in ("[[", "{{"):
            depth += 1
            i += 2
            continue
        if two in ("]]", "}}") and depth:
            depth -= 1
            i += 2
            continue
        if inner[i] == sep and depth == 0:
            parts.append(inner[start:i])
            start = i + 1
        i += 1
    parts.append(inner[start:])
    return parts


def _render_template(inner: str) -> str:
    """Visible text of the template ``{{inner}}`` (inner templates already rendered): usually ``""``."""
    args = _split_top_level(inner)
    name = args[0].strip().replace("_", " ").lower()
    positional = [a.strip() for a in args[1:] if not _NAMED_ARG.match(a)]
    named = {}
    for a in args[1:]:
        if _NAMED_ARG.match(a):
            key, _, value = a.partition("=")
            named[key.strip().lower()] = value.strip()
    if name in _LITERAL_TEMPLATES:
        return _LITERAL_TEMPLATES[name]
    if name.startswith(("formatnum:", "lc:", "uc:", "lcfirst:", "ucfirst:")):
        return name.split(":", 1)[1] if name.startswith("formatnum:") else args[0].split(":", 1)[1].strip()
    if name in ("convert", "cvt"):
        if not positional:
            return ""
        if len(positional) >= 4 and positional[1].lower() in _RANGE_WORDS:
            return f"{positional[0]} {positional[1]} {positional[2]} {positional[3]}"
        return f"{positional[0]} {positional[1]}" if len(positional) >= 2 else positional[0]
    if name in ("as of",):
        return "As of " + positional[0] if positional else ""
    if name in ("c.", "circa"):
        return "c. " + positional[0] if positional else "c."
    if name == "frac":
        return "/".join(positional[-2:]) if len(positional) >= 2 else (f"1/{positional[0]}" if positional else "")
    if name in _KEEP_FIRST_ARG:
        if name in ("quote", "quotation") and "text" in named:
            return named["text"]
        return positional[0] if positional else ""
    if name in _KEEP_LAST_ARG or name.startswith("lang-"):
        return positional[-1] if positional else ""
    return ""


def _strip_braces(text: str) -> str:
    """Render/drop templates {{...}} and drop tables {| ... |} (both nest)."""
    out: list[str] = []
    pos = 0
    while True:
        stack: list[tuple[str, int, list[str]]] = []  # (kind, start offset, buffer)
        buf = out
        i = pos
        unclosed_at = -1
        while True:
            m = _TOKENS_BRACES.search(text, i)
            if m is None:
                buf.append(text[i:])
                if stack:
                    unclosed_at = stack[0][1]
                break
            tok = m.group().strip(" \t:")
            if tok == "|}" and (not stack or stack[-1][0] != "tbl"):
                if stack:  # e.g. "|}}" closing a template: not a table end
                    buf.append(text[i : m.start() + m.group().index("|") + 1])
                    i = m.start() + m.group().index("|") + 1
                else:  # stray table end
                    buf.append(text[i : m.start()])
                    i = m.end()
                continue
            if tok == "}}" and stack and stack[-1][0] == "tbl":
                buf.append(text[i : m.end()])  # inside a dropped table
                i = m.end()
                continue
            buf.append(text[i : m.start()])
            i = m.end()
            if tok in ("{{", "{|"):
                stack.append(("tpl" if tok == "{{" else "tbl", m.start() + len(m.group()) - 2, []))
                buf = stack[-1][2]
            elif tok == "}}":
                if not stack:
                    continue  # stray closing braces
                _, _, inner = stack.pop()
                buf = stack[-1][2] if stack else out
                buf.append(_render_template("".join(inner)))
            else:  # "|}" closing a table
                stack.pop()
                buf = stack[-1][2] if stack else out
        if unclosed_at < 0:
            return "".join(out)
        # An opening token was never closed.  `out` holds the text before it; drop just that
        # token and rescan the rest (keeping what was rendered so far).
        pos = unclosed_at + 2


def _render_link(inner: str) -> str:
    target, pipe, label = inner.partition("|")
    target = target.strip()
    visible_colon = target.startswith(":")
    target = target.lstrip(":").strip()
    prefix, colon, rest = target.partition(":")
    prefix_l = prefix.strip().lower()
    if colon:
        if prefix_l in _HIDDEN_LINK_NS and not visible_colon:
            return ""
        if _LANG_CODE.match(prefix_l) and not visible_colon and not pipe and prefix_l not in _INTERWIKI:
            return ""  # interlanguage link
    if pipe:
        label = label.strip()
        if label:
            return label
        # pipe trick: [[Foo (bar)|]] -> Foo, [[wikt:foo|]] -> foo
        shown = rest if colon and (prefix_l in _INTERWIKI or prefix_l in _HIDDEN_LINK_NS) else target
        return re.sub(r"\s*\([^()]*\)\s*$", "", shown).strip()
    if colon and (prefix_l in _INTERWIKI or prefix_l in _HIDDEN_LINK_NS):
        return rest.strip()
    if target.startswith("#"):
        return target[1:]
    return target


def _strip_links(text: str) -> str:
    """Replace [[target|label]] by label, [[target]] by target; drop file/category/interlanguage links.

    Links nest (file captions contain links); inner links are rendered first.
    """
    out: list[str] = []
    stack: list[list[str]] = []
    buf = out
    i = 0
    while (m := _TOKENS_LINKS.search(text, i)) is not None:
        buf.append(text[i : m.start()])
        i = m.end()
        if m.group() == "[[":
            stack.append([])
            buf = stack[-1]
            continue
        if not stack:
            continue  # a stray "]]" is dropped
        if text.startswith("]", i):
            inner_so_far = "".join(buf)
            if inner_so_far.count("[") > inner_so_far.count("]"):
                # "...[http://x label]]]": the first "]" closes the external link inside
                buf.append("]")
                i = m.start() + 1
                continue
        inner = stack.pop()
        buf = stack[-1] if stack else out
        buf.append(_render_link("".join(inner)))
    buf.append(text[i:])
    while stack:  # unclosed "[[": keep the text, lose the brackets
        inner = stack.pop()
        buf = stack[-1] if stack else out
        buf.append("".join(inner))
    return "".join(out)


def _drop_appendix_sections(text: str) -> str:
    """Drop trailing level-2 sections that are only references / links / see-also lists."""
    lines = text.split("\n")
    level2 = [k for k, line in enumerate(lines) if (h := _HEADING.match(line)) and len(h.group(1)) == 2]
    cut = len(lines)
    for k in reversed(level2):
        title = _QUOTES.sub("", _HEADING.match(lines[k]).group(2))
        title = re.sub(r"\s+", " ", html.unescape(title)).strip().lower()
        if not _APPENDIX_HEADING.match(title):
            break
        cut = k
    return "\n".join(lines[:cut])


def _finish_lines(text: str) -> str:
    """Headings, list markers, rules and whitespace; drop headings of sections left empty."""
    blocks: list[tuple[int, str]] = []  # (heading level or 0, text); "" = paragraph break
    for raw in text.split("\n"):
        line = raw.strip()
        h = _HEADING.match(line)
        if h:
            title = re.sub(r"\s+", " ", h.group(2)).strip(" =")
            if title:
                blocks.append((len(h.group(1)), title))
            continue
        if re.fullmatch(r"-{4,}", line):
            line = ""
        is_item = bool(_LIST_MARK.match(line))
        line = _LIST_MARK.sub("", line)
        line = re.sub(r"[ \t\u00a0\u2009\u200b]+", " ", line).strip()
        # punctuation left behind by removed templates / refs
        line = re.sub(r"\(\s*(?:[,;:]\s*)*\)", "", line)
        line = re.sub(r"\(\s*(?:[,;:]\s*)+", "(", line)
        line = re.sub(r"(?:\s*[,;:])+\s*\)", ")", line)
        line = re.sub(r"([,;])(?:\s*[,;])+", r"\1", line)
        line = re.sub(r"\s+([,.;:!?)])", r"\1", line)
        line = re.sub(r"([(])\s+", r"\1", line)
        line = re.sub(r" {2,}", " ", line).strip()
        if line and (not re.search(r"\w", line) or re.fullmatch(r"\([^()]*\)", line)):
            line = ""  # debris: punctuation only, or a lone parenthesis whose subject was a template
        if not line and (is_item or raw.strip()):
            continue  # a list item or line emptied by stripping is not a paragraph break
        blocks.append((0, line))
    # drop headings whose section is empty (next content is a heading of the same or a higher level)
    keep: list[tuple[int, str]] = []
    for level, line in reversed(blocks):
        if level:
            nxt = next(((lv, ln) for lv, ln in reversed(keep) if ln), None)
            if nxt is None or (nxt[0] and nxt[0] <= level):
                continue
        keep.append((level, line))
    keep.reverse()
    out: list[str] = []
    after_heading = False
    for level, line in keep:
        if level:
            out.extend(["", line])
            after_heading = True
        elif line or not after_heading:  # no blank line right after a heading
            out.append(line)
            after_heading = after_heading and not line
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def strip_wikitext(wikitext: str) -> str:
    """Turn MediaWiki markup into plain readable text.

    Drops templates (a few inline formatting ones keep their text, e.g. ``{{lang|fr|temps}}``
    -> ``temps``, ``{{convert|5|km}}`` -> ``5 km``), tables, references, comments, math, galleries,
    file/image/category/interlanguage links (nested links in captions included) and trailing
    reference / external-link / see-also sections; keeps link labels, external link labels,
    inner text of other HTML tags; headings become a line of their own; list markers, bold/italic
    quotes, magic words and HTML entities are resolved; blank lines and spaces are collapsed.
    """
    text = wikitext.replace("\r\n", "\n").replace("\r", "\n")
    text = _COMMENT.sub("", text)
    text = _REF_SELF.sub("", text)
    text = _REF_PAIR.sub("", text)
    text = _DROP_PAIR.sub("", text)
    text = _DROP_SELF.sub("", text)
    text = re.sub(r"<nowiki\s*/>", "", text, flags=re.IGNORECASE)
    text = _drop_appendix_sections(text)
    text = _strip_braces(text)
    text = _strip_links(text)
    text = _EXTERNAL.sub(lambda m: m.group(1) or "", text)
    text = _BARE_URL.sub("", text)
    text = _BR.sub("\n", text)
    text = _TAG.sub("", text)
    text = _QUOTES.sub("", text)
    text = _MAGIC.sub("", text)
    text = html.unescape(text)
    # debris of unbalanced markup must not survive as markup
    for debris in ("{{", "}}", "[[", "]]", "{|", "|}"):
        text = text.replace(debris, "")
    # leftover table-row / template-argument lines (e.g. from a template missing its closing braces)
    text = re.sub(r"(?m)^\s*(?:\|[-+]?|!).*$", "", text)
    return _finish_lines(text)


# --------------------------------------------------------------------------- splits


def _title_key(title: str) -> bytes:
    return hashlib.sha256(title.encode("utf-8")).digest()


def split_articles(articles: Iterable[Article]) -> dict[str, list[Article]]:
    """Deterministic split by article: ~70% calibration, ~10% validation, ~20% heldout.

    Articles are ranked by the SHA-256 of their title; the lowest-ranked 70% go to
    calibration, the next 10% to validation, the rest to heldout.  Each split keeps the
    input (dump) order.  The splits are disjoint and together hold every article.
    """
    articles = list(articles)
    titles = [a.title for a in articles]
    if len(set(titles)) != len(titles):
        raise UserError("duplicate article titles: the split is by title and needs them unique")
    ranked = sorted(range(len(articles)), key=lambda k: _title_key(articles[k].title))
    n = len(articles)
    n_cal = round(n * SPLIT_FRACTIONS["calibration"])
    n_val = round(n * (SPLIT_FRACTIONS["calibration"] + SPLIT_FRACTIONS["validation"])) - n_cal
    assignment: dict[int, str] = {}
    for rank, k in enumerate(ranked):
        assignment[k] = "calibration" if rank < n_cal else "validation" if rank < n_cal + n_val else "heldout"
    return {name: [a for k, a in enumerate(articles) if assignment[k] == name] for name in SPLITS}


@functools.lru_cache(maxsize=1)
def _embedded_splits() -> dict[str, tuple[Article, ...]]:
    splits = split_articles(read_articles(embedded_dump_path()))
    return {name: tuple(arts) for name, arts in splits.items()}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown Wikipedia split {split!r}; choose one of: {', '.join(SPLITS)}")


def embedded_articles(split: str) -> tuple[Article, ...]:
    """Articles of one split of the embedded dump (cached)."""
    _check_split(split)
    return _embedded_splits()[split]


@functools.lru_cache(maxsize=None)
def embedded_text(split: str) -> str:
    """Plain text of one split of the embedded dump, articles joined by a blank line (cached)."""
    _check_split(split)
    return "\n\n".join(a.text for a in _embedded_splits()[split])
