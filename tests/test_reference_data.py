"""tests/reference/ is part of the repository: the tests read it by default, and it holds the oracle files
its README lists, with the sizes listed there (a truncated or replaced oracle fails here first)."""
import os
import re

from conftest import REFERENCE_DIR, REPO_ROOT, reference_dir


def test_default_reference_dir_is_in_the_repository(monkeypatch, tmp_path):
    monkeypatch.delenv("LDM_REFERENCE_DIR", raising=False)
    assert reference_dir() == REPO_ROOT / "tests" / "reference" == REFERENCE_DIR
    monkeypatch.setenv("LDM_REFERENCE_DIR", str(tmp_path))
    assert reference_dir() == tmp_path


def test_reference_files_match_their_readme():
    text = (REFERENCE_DIR / "README.md").read_text(encoding="utf-8")
    files_section = text.split("## 2. Files", 1)[1].split("\n## ", 1)[0]
    listed = {m.group(1): int(m.group(2)) for m in re.finditer(r"^\| `([^`]+)` \| (\d+)", files_section, re.M)}
    assert len(listed) == 13
    assert set(listed) <= set(os.listdir(REFERENCE_DIR))
    for name, size in listed.items():
        assert (REFERENCE_DIR / name).stat().st_size == size, name
