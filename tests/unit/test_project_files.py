"""The files a user or a packager looks for first: the licence and the changelog."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_licence_is_the_apache_2_0_text_the_package_declares() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "3. Grant of Patent License." in text
    assert "END OF TERMS AND CONDITIONS" in text
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]
    assert declared == {"text": "Apache-2.0"}


def test_the_changelog_keeps_an_unreleased_section_first() -> None:
    lines = (ROOT / "CHANGELOG.md").read_text().splitlines()
    assert lines[0] == "# Changelog"
    assert "keepachangelog.com" in "\n".join(lines[:8])
    versions = [line for line in lines if line.startswith("## ")]
    assert versions[0] == "## [Unreleased]"
