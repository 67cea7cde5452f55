"""Embedded Wikipedia text (from the gensim wheel's test data): lookup, markup stripping, splits."""

from __future__ import annotations

import importlib.metadata
import pathlib
import random

import pytest

from modegpt_jax import wikipedia as wk
from modegpt_jax.errors import UserError


@pytest.fixture(scope="module")
def articles() -> list[wk.Article]:
    return wk.read_articles(wk.embedded_dump_path())


@pytest.fixture(scope="module")
def splits(articles) -> dict[str, list[wk.Article]]:
    return wk.split_articles(articles)


# --------------------------------------------------------------------------- locating the file


def test_dump_is_found():
    path = wk.embedded_dump_path()
    assert path.is_file()
    assert path.name == "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    assert path.read_bytes()[:3] == b"BZh"


def _no_gensim(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(wk.importlib.metadata, "distribution", missing)
    monkeypatch.setattr(wk.importlib.util, "find_spec", lambda name, package=None: None)


def test_missing_package_is_a_user_error_naming_pip(monkeypatch):
    _no_gensim(monkeypatch)
    with pytest.raises(UserError) as info:
        wk.embedded_dump_path()
    message = str(info.value)
    assert "pip install --no-deps gensim" in message
    assert "\n" not in message


def test_missing_file_is_a_user_error_naming_pip(monkeypatch, tmp_path):
    class FakeDistribution:
        def locate_file(self, relpath):
            return tmp_path / relpath

    monkeypatch.setattr(wk.importlib.metadata, "distribution", lambda name: FakeDistribution())
    monkeypatch.setattr(wk.importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(UserError, match=r"pip install --no-deps gensim"):
        wk.embedded_dump_path()


def test_lookup_does_not_import_gensim():
    import sys

    wk.embedded_dump_path()
    assert "gensim" not in sys.modules


# --------------------------------------------------------------------------- real content


def test_articles_and_markup_gone(articles):
    assert 80 <= len(articles) <= 110  # 106 non-redirect main-namespace pages in the dump
    titles = [a.title for a in articles]
    assert len(set(titles)) == len(titles)
    assert "AccessibleComputing" not in titles  # a redirect
    for a in articles:
        assert len(a.text) >= wk.MIN_ARTICLE_CHARS
        for debris in ("{{", "}}", "[[", "]]", "<ref", "{|", "|}", "<!--", "&nbsp;", "&amp;", "__TOC__"):
            assert debris not in a.text, (a.title, debris)
        lines = a.text.split("\n")
        assert "References" not in lines and "External links" not in lines, a.title
        assert not any(line.startswith(("*", "|", "thumb|")) for line in lines), a.title


def test_known_article_text(articles):
    by_title = {a.title: a for a in articles}
    anarchism = by_title["Anarchism"].text
    assert anarchism.startswith(
        "Anarchism is a political philosophy that advocates self-governed societies based on voluntary institutions."
    )
    assert "\nEtymology and terminology\n" in anarchism  # a heading on its own line
    assert "Redirect2" not in anarchism and "Anarchist (comics)" not in anarchism  # hatnote template
    tai = by_title["International Atomic Time"].text
    assert tai.startswith("International Atomic Time (TAI, from the French name Temps Atomique International) is")
    assert (
        "TAI as a time scale is a weighted average of the time kept by over 400 atomic clocks "
        "in over 50 national laboratories worldwide."
    ) in tai


# --------------------------------------------------------------------------- splits


def test_splits_disjoint_and_cover(articles, splits):
    assert set(splits) == {"calibration", "validation", "heldout"}
    names = {k: {a.title for a in v} for k, v in splits.items()}
    assert not names["calibration"] & names["validation"]
    assert not names["calibration"] & names["heldout"]
    assert not names["validation"] & names["heldout"]
    assert names["calibration"] | names["validation"] | names["heldout"] == {a.title for a in articles}
    n = len(articles)
    assert abs(len(splits["calibration"]) - 0.7 * n) <= 1
    assert abs(len(splits["validation"]) - 0.1 * n) <= 1
    assert abs(len(splits["heldout"]) - 0.2 * n) <= 1
    total = sum(len(a.text) for a in articles)
    share = {k: sum(len(a.text) for a in v) / total for k, v in splits.items()}
    assert 0.55 < share["calibration"] < 0.85 and 0.03 < share["validation"] < 0.2 and 0.1 < share["heldout"] < 0.35


def test_splits_deterministic(articles, splits):
    again = wk.split_articles(wk.read_articles(wk.embedded_dump_path()))
    assert again == splits
    shuffled = list(articles)
    random.Random(0).shuffle(shuffled)
    reshuffled = wk.split_articles(shuffled)
    assert {k: {a.title for a in v} for k, v in reshuffled.items()} == {
        k: {a.title for a in v} for k, v in splits.items()
    }


def test_embedded_text(splits):
    heldout = wk.embedded_text("heldout")
    assert heldout == "\n\n".join(a.text for a in splits["heldout"])
    assert wk.embedded_text("heldout") is heldout  # cached
    assert "Anarchism is a political philosophy" in wk.embedded_text("calibration")
    assert "Anarchism is a political philosophy" not in heldout + wk.embedded_text("validation")
    for a in splits["calibration"]:
        assert a.text[:200] not in heldout
    with pytest.raises(UserError, match="heldout"):
        wk.embedded_text("test")


# --------------------------------------------------------------------------- stripping, synthetic


@pytest.mark.parametrize(
    ("wikitext", "expected"),
    [
        ("Before {{Infobox|a={{nowrap|x}}|b=[[c|d]]}} after.", "Before after."),
        ("{{Infobox\n| a = {{x|{{y}}}}\n|}}\nText after.", "Text after."),
        ("[[File:X.jpg|thumb|A [[cat]] on a [[mat|rug]].]]The cat sat.", "The cat sat."),
        ("[[Image:a.png|thumb|b [[x|y]] [http://e.org ext]]] Prose.", "Prose."),
        ("The [[Dog (animal)|dog]]s bark at [[cats]] and [[Foo (bar)|]].", "The dogs bark at cats and Foo."),
        ('Intro.\n{| class="wikitable"\n|-\n| a || {{flag|b}}\n|-\n! c\n|}\nOutro.', "Intro.\n\nOutro."),
        ("A\n{|\n| x\n{|\n| nested\n|}\n| {{tpl|}}\n|}\nB", "A\n\nB"),
        ('Fact.<ref name="a">{{cite web|url=http://x|title=T}}</ref> More.<ref name=b/> End<ref>x</ref>.',
         "Fact. More. End."),
        ("== History ==\n\n'''Bold''' and ''italic'' &amp; A&nbsp;B 1&ndash;2<!-- hidden -->__TOC__",
         "History\nBold and italic & A B 1–2"),
        ("Intro.\n=== Sub ===\n* one\n* two\n# three\n: four", "Intro.\n\nSub\none\ntwo\nthree\nfour"),
        ("Body.\n== See also ==\n* [[X]]\n== References ==\n{{reflist}}\n== External links ==\n* [http://x.org X]\n"
         "[[Category:Foo]]\n[[de:Foo]]", "Body."),
        ("Visit [http://example.com the site]. {{lang|fr|temps}} is {{convert|5|km}}.",
         "Visit the site. temps is 5 km."),
        ("A<br/>B <small>small</small> <math>x^2</math> C<sup>2</sup>", "A\nB small C2"),
        ("Text {{broken and [[more]]", "Text broken and more"),
        ("First.\n\n\n\nSecond   with    spaces.", "First.\n\nSecond with spaces."),
        ("Name ({{IPAc-en|x}}, {{respell|y}}; born 1900) was.", "Name (born 1900) was."),
    ],
)  # fmt: skip
def test_strip_wikitext(wikitext, expected):
    assert wk.strip_wikitext(wikitext) == expected


def test_read_articles_filters(tmp_path: pathlib.Path):
    body = "Plain prose sentence number {}. " * 20
    xml = f"""<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
  <page><title>Kept</title><ns>0</ns><id>1</id><revision><text>'''Kept''' is {body}</text></revision></page>
  <page><title>Redir</title><ns>0</ns><id>2</id><redirect title="Kept" />
    <revision><text>#REDIRECT [[Kept]]</text></revision></page>
  <page><title>Talk:Kept</title><ns>1</ns><id>3</id><revision><text>{body}</text></revision></page>
  <page><title>Stub</title><ns>0</ns><id>4</id><revision><text>{{{{Infobox|x={body}}}}} Tiny.</text></revision></page>
</mediawiki>"""
    path = tmp_path / "dump.xml"
    path.write_text(xml, encoding="utf-8")
    got = wk.read_articles(path)
    assert [a.title for a in got] == ["Kept"]
    assert got[0].text.startswith("Kept is Plain prose sentence number {}.")
    with pytest.raises(UserError):
        wk.read_articles(tmp_path / "missing.xml.bz2")
