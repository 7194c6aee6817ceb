"""The trajectory page (sample.py --trajectory=run.html), read back from headless Chromium: it shows the passes the
sampler made, as its callback saw them. Without chromium these tests skip, except in CI (CI=1), where they fail."""
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from conftest import cli

from data import save_checkpoint
from sample import Trajectory, generate
from test_sample import V, sharp_model

CHROMIUM = shutil.which("chromium")
browser = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="no chromium (CI installs it)")
PIECES = ["</script>", "&amp;", " ", "\n", "e", "f", "g", "h", "i", "j", "k"]  # what the page must escape
M = V  # the mask token


class Pieces:
    decode = staticmethod(lambda ids: "".join(PIECES[i] for i in ids))


def shown(t):
    """A token as the page writes it alone (a space visible) or in the text (a line break as ⏎)."""
    return "␣" if t == " " else t.replace("\n", "⏎")


def browse(path, *flags, fragment=""):
    """Headless Chromium on the file at path#fragment, as a user opens it from disk; returns its stdout."""
    assert CHROMIUM, "CI runs the browser tests: install chromium"
    with tempfile.TemporaryDirectory() as profile:
        r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                            "--disable-background-networking", "--disable-component-update", "--disable-sync",
                            f"--user-data-dir={profile}", "--virtual-time-budget=10000", *flags,
                            Path(path).as_uri() + fragment], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Page(HTMLParser):
    """The pass sections of a page's DOM: per pass, the text's spans and the σ slots as [classes, text], the
    revealed tokens and their probabilities, the cache's committed slots before and after, the mask's rows."""

    def __init__(self, dom):
        super().__init__()
        self.passes, self.stack = {}, []
        self.feed(dom)

    def handle_starttag(self, tag, attrs):
        attrs, parent = dict(attrs), self.stack[-1][1] if self.stack else []
        cls = (attrs.get("class") or "").split()
        if tag == "section":
            self.now = self.passes[int(attrs["id"].removeprefix("pass-"))] = dict(
                text=[], sigma=[], revealed=[], p=[], mask=[], before=None, after=None)
        elif tag == "span" and {"text", "sigma"} & set(parent):
            self.now["text" if "text" in parent else "sigma"].append([cls, ""])
        elif tag == "div" and "row" in cls:
            self.now["mask"].append("")
        elif tag == "i" and "row" in parent:
            self.now["mask"][-1] += "1" if "on" in cls else "0"
        if tag not in VOID:
            self.stack.append((tag, cls))

    def handle_endtag(self, tag):
        if tag not in VOID:
            self.stack.pop()

    def handle_data(self, data):
        tag, cls = self.stack[-1] if self.stack else ("", [])
        parent = self.stack[-2][1] if len(self.stack) > 1 else []
        if tag == "span" and {"text", "sigma"} & set(parent):
            self.now["text" if "text" in parent else "sigma"][-1][1] += data
        elif "tok" in cls:
            self.now["revealed"].append(data)
        elif "p" in cls:
            self.now["p"].append(float(data))
        elif {"before", "after"} & set(cls):
            self.now[cls[0]] = int(data)


def record(model, template, path, **kw):
    """generate() with two callbacks: the page's recorder, which writes the page to path, and a plain log of
    what the sampler handed each pass (read from its tensors here, not from the recorder)."""
    page, log = Trajectory(Pieces()), []

    def callback(x, order, mask, logits, cache, **s):
        page(x=x, order=order, mask=mask, logits=logits, cache=cache, **s)
        revealed = x[0, s["done"]:s["end"]]
        probs = logits[0].double().softmax(-1)[torch.arange(len(revealed)), revealed]
        log.append(dict(s, x=x[0].tolist(), order=order[0].tolist(), revealed=revealed.tolist(),
                        probs=probs.tolist(), mask=None if mask is None else mask.tolist(),
                        committed=None if cache is None else cache.committed))

    _, nfe = generate(model, template, 2, seed=3, callback=callback, **kw)
    Path(path).write_text(page.html("a test run"), encoding="utf-8")
    assert len(log) == nfe
    return log


RUNS = {  # denoiser, block size, template, generate()'s keywords
    "B, infill": ("B", 24, [4, 5, M, M, 6, M, 7, M, M, M, 2, 8, M, M, M, 9, 10, M, M, 3], dict(steps=4, alpha_0=0.5)),
    "A, prompt": ("A", 24, [0, 1, 2, 3] + [M] * 16, dict(steps=4, alpha_0=0.5)),
    "MDLM": ("mdlm", 24, [M] * 20, dict(steps=5, alpha_0=1.0)),
    "B, windows, static shapes": ("B", 12, [4, 5, 6] + [M] * 21, dict(steps=3, alpha_0=0.5, static=True)),
}


@browser
@pytest.mark.parametrize("run", RUNS)
def test_page_shows_every_pass_as_the_sampler_ran_it(run, tmp_path):
    """At #pass=all the page draws every pass, and each one shows what the sampler logged: the text in its original
    order (given, revealed before, revealed now, masks), the σ slots in the cache, fed and read, the revealed tokens
    with their probabilities, the cache's committed slots and the attention mask's rows."""
    denoiser, block_size, template, kw = RUNS[run]
    log = record(sharp_model(block_size=block_size, denoiser=denoiser), torch.tensor(template), tmp_path / "run.html",
                 **kw)
    page = Page(browse(tmp_path / "run.html", "--dump-dom", fragment="#pass=all")).passes
    assert sorted(page) == list(range(1, len(log) + 1)), f"a section per pass: {sorted(page)}, NFE {len(log)}"
    for n, (e, got) in enumerate(zip(log, (page[n] for n in sorted(page))), 1):
        W, given = len(e["x"]), next(f["done"] for f in log if f["offset"] == e["offset"] and f["step"] == 0)
        state = lambda s: "given" if s < given else "old" if s < e["done"] else "new" if s < e["end"] else "mask"
        slot = {p: s for s, p in enumerate(e["order"])}
        text = [[[state(slot[p])], "_" if state(slot[p]) == "mask" else PIECES[e["x"][slot[p]]].replace("\n", "⏎")]
                for p in range(W)]
        assert [c for c, _ in got["text"][:e["offset"]]] == [["out"]] * e["offset"], f"pass {n}: the text before"
        assert [[c, t.replace("⏎\n", "⏎")] for c, t in got["text"][e["offset"]:]] == text, \
            f"pass {n}: the window's text in its original order"
        role = lambda s: ("cache" if s < e["first"] else "clean" if s < e["done"] else "reveal" if s < e["end"] else
                          "rest" if s < e["last"] else "unfed")
        assert [c for c, _ in got["sigma"]] == [[role(s)] + ["read"] * (s < e["keys"]) for s in range(W)], \
            f"pass {n}: the σ slots in the cache, fed and read"
        assert [t for _, t in got["sigma"]] == [shown(PIECES[t]) if s < e["end"] else "_" for s, t in
                                                enumerate(e["x"])], f"pass {n}: the tokens in σ order"
        assert got["revealed"] == [shown(PIECES[t]) for t in e["revealed"]], f"pass {n}: the revealed tokens"
        assert all(abs(a - b) <= 5e-4 + 1e-9 for a, b in zip(got["p"], e["probs"], strict=True)), \
            f"pass {n}: the revealed tokens' probabilities"
        assert (got["before"], got["after"]) == ((None, None) if e["committed"] is None else
                                                 (e["first"], e["committed"])), f"pass {n}: the cache's committed slots"
        rows = e["mask"] or [[True] * e["keys"]] * (e["last"] - e["first"])  # None: all see all (MDLM)
        assert got["mask"] == ["".join("01"[b] for b in row) for row in rows], f"pass {n}: the attention mask"
    cached = {"B, infill": {True}, "A, prompt": {False, True}, "MDLM": {False}, "B, windows, static shapes": {True}}
    assert {e["committed"] is not None for e in log} == cached[run], "B caches, A from its sequential phase, MDLM never"
    if run.startswith("B, windows"):
        assert len({e["offset"] for e in log}) == 3 and any(e["last"] > e["end"] for e in log), "windows, padding"


@browser
def test_page_opens_at_the_pass_its_address_names_and_is_drawn(tmp_path):
    """run.html#pass=N opens at pass N alone, its controls at N; its screenshot is not blank and shows the tokens
    revealed now in red."""
    denoiser, block_size, template, kw = RUNS["B, infill"]
    log = record(sharp_model(block_size=block_size, denoiser=denoiser), torch.tensor(template), tmp_path / "run.html",
                 **kw)
    dom = browse(tmp_path / "run.html", "--dump-dom", fragment="#pass=3")
    assert list(Page(dom).passes) == [3] and f'id="where">pass 3 / {len(log)}<' in dom, "#pass=3 shows pass 3"
    browse(tmp_path / "run.html", f"--screenshot={tmp_path / 'shot.png'}", "--window-size=1000,900",
           fragment="#pass=3")
    rgb = matplotlib.image.imread(tmp_path / "shot.png")[..., :3]
    assert (rgb.min(-1) < 0.8).sum() > 5000, "the page is drawn"
    red = (abs(rgb - np.array([0xd6, 0x27, 0x28]) / 255).max(-1) < 0.05).sum()
    assert red > 50, "the tokens revealed now are drawn in red"


def test_page_makes_no_network_request(tmp_path):
    """The page is one file: no http(s) URL, no src or href, no CSS url() or @import."""
    record(sharp_model(denoiser="mdlm"), torch.full((12,), M), tmp_path / "run.html", steps=3)
    page = (tmp_path / "run.html").read_text(encoding="utf-8")
    assert "<script>" in page and not re.search(r"https?:|\b(src|href)\s*=|url\(|@import", page, re.I)


def test_trajectory_flag_picks_the_format(tmp_path):
    """--trajectory=x.html writes the page, a pass per NFE; x.svg the picture; any other extension is one line."""
    model, itos = sharp_model(), dict(enumerate("abc\ndefghij"))
    meta = dict(tokenizer="char", vocab_size=V, itos=itos, stoi={c: i for i, c in itos.items()})
    os.mkdir(tmp_path / "out-t")
    save_checkpoint(dict(model=model.state_dict(), model_args=asdict(model.config), iter_num=0,
                         config=dict(alpha_0=0.5), meta=meta), tmp_path / "out-t")
    for path in ("run.html", "run.svg"):
        r = cli("sample.py", "--device=cpu", "--num_samples=1", "--steps=4", f"--trajectory={path}", cwd=tmp_path)
        picture = (tmp_path / path).read_text(encoding="utf-8")
        assert r.returncode == 0 and "wrote the trajectory of sample 1" in r.stderr, r.stderr
        nfe = int(re.search(r"NFE (\d+)", r.stdout)[1])
        assert (picture.count('"step":') == nfe and picture.startswith("<!DOCTYPE html>") if path == "run.html" else
                picture.startswith("<svg")), path
    r = cli("sample.py", "--trajectory=run.png", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--trajectory=run.png must end in .html" in r.stderr
