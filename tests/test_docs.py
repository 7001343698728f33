"""Every file of this repository that the README, the docs and the docstrings point to exists: a pointer to a moved
or never-written file (the README and `infer/reno.py` once pointed to a METHODS.md that was not in the repo) fails."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POINTER = re.compile(r"\b(?:docs|scripts|configs|tests|diffalign|assets)/[^\s`'\"(),;:\[\]]*")
TEMPLATE = set("<*{")  # a pattern such as configs/<method>/*.yaml names no one file
DOC_NAME = re.compile(r"\b[A-Z][A-Z_]+\.md\b")
# Paths of another project's repository that the docs name as such.
PEER_PATHS = {
    "assets/hps_v2_all.txt",  # mihirp1998/AlignProp's prompt list, fetched by the curl line of the configs
    "scripts/train_nft_sd3.py",  # NVlabs/DiffusionNFT's training script, cited for its defaults
}


def documents() -> list[Path]:
    """The README, the docs and every module of the package."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "diffalign").rglob("*.py"))]


def test_every_repository_path_the_docs_name_exists():
    missing = []
    for doc in documents():
        for line_no, line in enumerate(doc.read_text().splitlines(), 1):
            for path in (re.sub(r"</\w+>.*", "", p).rstrip(".") for p in POINTER.findall(line)):
                if TEMPLATE.isdisjoint(path) and path not in PEER_PATHS and not (ROOT / path).exists():
                    missing.append(f"{doc.relative_to(ROOT)}:{line_no}: {path}")
    assert not missing, "\n".join(missing)


def test_every_markdown_file_the_docs_name_by_its_name_exists():
    known = {p.name for p in ROOT.glob("*.md")} | {p.name for p in (ROOT / "docs").rglob("*.md")}
    missing = [
        f"{doc.relative_to(ROOT)}: {name}"
        for doc in documents()
        for name in DOC_NAME.findall(doc.read_text())
        if name not in known
    ]
    assert not missing, "\n".join(missing)
