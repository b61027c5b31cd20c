"""The README and docs/ cannot drift from the code.

- docs/options.md is exactly what scripts/gen_docs.py writes from the command line's parser;
- every relative link of README.md and docs/*.md points to a file (and heading) that exists,
  and no page names a path outside the repository;
- every path pattern of docs/run-folder.md's layout block matches a file of a real run folder,
  and every file of that run folder is matched by a pattern (one small run, slow).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import pytest

from conftest import TINY, load_script, make_kaggle
from transfer_ensemble import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LAYOUT_MARKER = "<!-- layout: checked by tests/test_docs.py -->"


def load_gen_docs():
    return load_script("gen_docs")


def test_options_page_is_what_the_generator_writes():
    expected = load_gen_docs().render()
    current = (ROOT / "docs" / "options.md").read_text()
    diff = "".join(difflib.unified_diff(current.splitlines(True), expected.splitlines(True),
                                        "docs/options.md", "generated", n=1))
    assert current == expected, f"docs/options.md is out of date: run `python scripts/gen_docs.py`\n{diff}"


def test_options_page_lists_every_option_of_every_command():
    """The generator itself must not drop anything: each subcommand's flags all appear."""
    gen = load_gen_docs()
    text = gen.render()
    parser = cli.build_parser()
    commands = gen._subcommands(parser)
    assert {name for name, _, _ in commands} >= {"extract", "train", "submit", "run", "predict", "report",
                                                   "demo-data"}
    for name, _, sub in commands:
        section = text.split(f"## {parser.prog} {name}\n", 1)[1].split("\n## ", 1)[0]
        for action in sub._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}`" in section, (name, flag)
            if action.help and action.option_strings and action.option_strings[0] != "-h":
                assert " ".join(action.help.split())[:40].replace("|", "\\|") in section, (name, action.dest)


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_links_resolve_and_stay_inside_the_repository(page: Path):
    text = page.read_text()
    assert "../shared" not in text and "/work/shared" not in text, f"{page.name} names a path outside the repository"
    for words in (r"\bissue \d+", r"\bsession\b", r"\bthe lead\b"):
        assert not re.search(words, text, flags=re.I), f"{page.name} speaks of how the work was organised ({words})"
    links = re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", re.sub(r"```.*?```", "", text, flags=re.S))
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.is_file(), f"{page.name}: the link {link} points to no file"
        assert ROOT in target.parents, f"{page.name}: the link {link} leaves the repository"
        if anchor and target.suffix == ".md":
            assert anchor in _anchors(target), f"{page.name}: the link {link} names no heading of {target.name}"


def test_readme_says_what_a_run_costs_in_figures_measured_in_performance_md():
    """The README's cost section quotes measurements, not guesses: each decimal figure in it is one
    docs/performance.md reports, and it names the CPU and the GPU it was measured on."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### What a run costs\n", 1)[1].split("\n#", 1)[0]
    performance = (ROOT / "docs" / "performance.md").read_text()
    figures = re.findall(r"\d[\d,]*\.\d+", section)
    assert len(figures) >= 4 and "CPU" in section and "GPU" in section
    assert [f for f in figures if f not in performance] == []
    assert "docs/performance.md" in section


def layout_patterns(page: Path) -> list[str]:
    """The path patterns of the layout block: the first field of each line starting with RUN/,
    braces expanded."""
    text = page.read_text()
    assert LAYOUT_MARKER in text, f"{page} lost its layout marker"
    block = text.split(LAYOUT_MARKER, 1)[1].split("```", 2)[1]
    patterns = []
    for line in block.splitlines():
        if line.startswith("RUN/"):
            patterns += _expand(re.split(r"\s{2,}", line.strip())[0])
    return patterns


def _expand(pattern: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [p for choice in match.group(1).split(",") for p in _expand(head + choice + tail)]


def _regex(pattern: str) -> re.Pattern:
    parts = re.split(r"(<[^>]+>|\*)", pattern)
    regex = "".join(r"\d+" if p == "<k>" else "[^/]+" if p.startswith("<") else "[^/]*" if p == "*"
                    else re.escape(p) for p in parts)
    return re.compile(regex + r"\Z")


def test_layout_patterns_parse():
    patterns = layout_patterns(ROOT / "docs" / "run-folder.md")
    assert "RUN/features/<split>/<source>/meta.json" in patterns
    assert "RUN/heads/<recipe>/<group>/fold<k>/model.npz" in patterns
    assert _regex("RUN/heads/<recipe>/<group>/fold<k>/model.npz").match("RUN/heads/linear/pooled/fold3/model.npz")
    assert not _regex("RUN/heads/<recipe>/oof_<group>.npy").match("RUN/heads/linear/pooled/oof_pooled.npy")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """One small run with every kind of file: a skipped bad image, both heads, a
    blend, a submission, a predict cache and a view beyond the pair."""
    base = tmp_path_factory.mktemp("docs_run")
    data = make_kaggle(base / "data", n_classes=3, per_class=4, n_test=3)
    (data / "train" / "tr0_0.png").write_bytes(b"not an image")
    run = base / "run"
    seed = "seed-folds2-epochs2-patience1"
    for args in (["extract", "--data", str(data), "--run", str(run), "--backbones", "xception", "--weights",
                  "random", "--image-size", str(TINY), "--batch-size", "8", "--scales", "1",
                  "--on-bad-image", "skip"],
                 ["train", "--run", str(run), "--head", "seed", "--folds", "2", "--epochs", "2", "--patience", "1"],
                 ["train", "--run", str(run), "--head", "linear", "--folds", "2"],
                 ["train", "--run", str(run), "--blend", f"{seed},linear-folds2"],
                 ["submit", "--run", str(run), "--out", str(base / "sub.csv")],
                 ["predict", "--run", str(run), "--heads", "linear-folds2", "--images", str(data / "test"),
                  "--out", str(base / "preds.csv")],
                 ["extract", "--data", str(data), "--run", str(run), "--backbones", "xception", "--weights",
                  "random", "--image-size", str(TINY), "--batch-size", "8", "--scales", "1",
                  "--on-bad-image", "skip", "--views", "original,flipped,center"]):
        assert cli.main(args) == 0, args
    return run


@pytest.mark.slow
def test_run_folder_layout_in_the_docs_matches_a_real_run(full_run: Path):
    patterns = layout_patterns(ROOT / "docs" / "run-folder.md")
    files = sorted("RUN/" + p.relative_to(full_run).as_posix() for p in full_run.rglob("*") if p.is_file())
    regexes = {pattern: _regex(pattern) for pattern in patterns}
    unmatched = [f for f in files if not any(r.match(f) for r in regexes.values())]
    assert not unmatched, f"files of a run folder that docs/run-folder.md does not describe: {unmatched}"
    unused = [p for p, r in regexes.items() if not any(r.match(f) for f in files)]
    assert not unused, f"docs/run-folder.md describes paths no run folder has: {unused}"
    assert any(f.endswith("/model.keras") for f in files) and any(f.endswith("/model.npz") for f in files)
    assert any("/heads/blend-" in f for f in files) and any(f.startswith("RUN/predict/") for f in files)
