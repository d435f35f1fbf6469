"""The README and the docs site: short, linked, and their figures generated from bench/results/."""

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def figures():
    """bench/figures.py as a module (bench/ holds scripts, not a package; figures imports figure_blocks)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return importlib.import_module("figures")
    finally:
        sys.path.remove(str(ROOT / "bench"))


def slug(heading: str) -> str:
    """A heading's anchor as GitHub and mkdocs' toc both write it (for headings without runs of spaces)."""
    text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)  # no headings in code blocks
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, re.M)}


def test_readme_is_short_and_opens_with_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    quickstart = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", quickstart, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]


def test_every_relative_link_of_the_readme_exists():
    """Links to files and to headings of .md files (docs/serving.md#the-serving-benchmark) resolve, so
    they work on GitHub as well as in the docs site."""
    bad = []
    for target in LINK.findall(README.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (README.parent / path) if path else README
        if not file.exists():
            bad.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            bad.append(f"{target}: {path or 'README.md'} has no heading #{anchor}")
    assert not bad, bad


def test_every_module_the_readme_and_docs_name_exists():
    named = {
        m.group(0)
        for page in [README, *DOCS]
        for m in re.finditer(r"\bdistill/[\w/]+\.py\b", page.read_text())
    }
    assert named, "the docs name the modules they describe"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"named in README.md or docs/ but not in the tree: {missing}"


def test_generated_figures_are_up_to_date():
    """Every figure block matches bench/results/*.json and the module docstrings: a hand edit of a
    generated figure, or a result changed without `make figures`, fails here."""
    out = subprocess.run(
        [sys.executable, "bench/figures.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_hand_edited_block_is_rewritten(tmp_path):
    f = figures()
    page = tmp_path / "page.md"
    page.write_text(
        "intro\n<!-- generated: kd-loss -->\n| ratio | **9.9x less** |\n<!-- end generated -->\nafter\n"
    )
    text = f.fill(page, used := set())
    assert used == {"kd-loss"}
    assert "9.9x" not in text and "4.2x less" in text  # bench/results/kd_loss.json's ratio
    assert text.startswith("intro\n<!-- generated: kd-loss -->\n") and text.endswith(
        "<!-- end generated -->\nafter\n"
    )


def test_unknown_or_unclosed_blocks_are_refused(tmp_path):
    f = figures()
    page = tmp_path / "page.md"
    page.write_text("<!-- generated: no-such-block -->\n<!-- end generated -->\n")
    with pytest.raises(SystemExit, match="unknown generated block"):
        f.fill(page, set())
    page.write_text("<!-- generated: kd-loss -->\n")
    with pytest.raises(SystemExit, match="has no"):
        f.fill(page, set())


def test_wrapped_prose_never_opens_a_list_or_heading():
    f = figures()
    line = "word " * 20 + "- not a list item " + "word " * 30 + "# not a heading " + "word " * 10
    for width in range(40, 120):
        wrapped = f.wrap([line], width)
        assert " ".join(wrapped).split() == line.split()
        assert not any(f.BLOCK_START.match(w) for w in wrapped[1:]), width


def test_recorders_read_what_make_demo_and_make_test_print(tmp_path):
    f = figures()
    assert f.pytest_outcome("....\n= 2 failed, 308 passed, 3 skipped in 3536.12s (0:58:56) =\n") == {
        "passed": 308,
        "failed": 2,
        "skipped": 3,
        "pytest_seconds": 3536,
    }
    log = tmp_path / "demo.log"
    summary = [
        "run: runs/tiny (ran: eval; skipped as unchanged: prepare; 12s)",
        "",
        "| model |",
        "gate: PASSED",
    ]
    log.write_text(
        "\n".join(["eval: student ...", "run: an earlier line", *summary, "", "real\t1m2s"]) + "\n"
    )
    assert f.summary_from_log(log) == [line for line in summary if line]
    bench = tmp_path / "bench.json"
    level = {"output_tokens_per_s": 38.314, "requests": 16}
    bench.write_text(json.dumps({"setups": {
        "teacher": {"levels": {"4": {"output_tokens_per_s": 93.02}}, "acceptance_rate": None},
        "teacher+student": {"levels": {"4": level}, "acceptance_rate": 0.13, "mean_acceptance_length": 1.5},
    }}))  # fmt: skip
    assert f.serve_figures(bench) == {
        "teacher": {
            "output_tokens_per_s": {"4": 93.02},
            "acceptance_rate": None,
            "mean_acceptance_length": None,
        },
        "teacher+student": {
            "output_tokens_per_s": {"4": 38.31},
            "acceptance_rate": 0.13,
            "mean_acceptance_length": 1.5,
        },
    }


def test_module_map_lists_every_module_under_distill():
    figures()
    listed = {path for path, _, _ in sys.modules["figure_blocks"].modules()}
    on_disk = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "distill").rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    }
    assert on_disk <= listed


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs comes with the dev extra")
def test_docs_site_builds_strict(tmp_path):
    """`mkdocs build --strict` (what `make docs` runs before the suite): a broken link or anchor fails."""
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
