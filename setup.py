"""Only what pyproject.toml cannot say: the toy assets and the shipped configs install under <prefix>/share/diffalign
(`diffalign.hub.shipped_dir` finds them there, or beside the package in a source checkout), every folder of them by
glob, so a new method's configs/<method>/ ships without a line here."""

from pathlib import Path

from setuptools import setup


def share(*roots: str) -> list[tuple[str, list[str]]]:
    """(install folder, files) for every folder under `roots` that holds files."""
    folders = sorted({path.parent for root in roots for path in Path(root).rglob("*") if path.is_file()})
    return [(f"share/diffalign/{folder.as_posix()}", sorted(str(p) for p in folder.iterdir() if p.is_file()))
            for folder in folders]  # fmt: skip


setup(data_files=share("assets", "configs"))
