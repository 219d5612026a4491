"""The project reads only its own files, ``../shared`` and the paths a user passes.

A fresh clone on another machine has nothing else: a test that read a file from this machine's work
folders once failed on every fresh clone. Checked on every tracked text file:

- no absolute path under a machine's work folders (the checkout's parent, the home folder, the
  folders the development and CI machines keep their work and tools in);
- no relative path that climbs out of the repository except into ``../shared``;
- no ``Path(__file__).parents[N]`` that climbs above the repository root.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# "../" followed by a name: a climb out of the folder the file is read from.
CLIMB = re.compile(r"(?<![\w./])\.\./(?!shared\b)([A-Za-z_][\w.-]*)")
# Path(__file__).resolve().parents[N] from a file d folders below the root climbs above it when N > d.
PARENTS = re.compile(r"parents\[(\d+)\]")


def _tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    files = []
    for name in names:
        path = ROOT / name
        if not path.is_file():
            continue
        head = path.read_bytes()[:4096]
        if b"\0" in head:  # binary: plots, wheels
            continue
        files.append(path)
    return files


@pytest.fixture(scope="module")
def tracked() -> list[tuple[Path, list[str]]]:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no tracked files to check")
    return [(p, p.read_text(errors="replace").splitlines()) for p in _tracked_text_files()]


def _machine_folders() -> tuple[str, ...]:
    """The folders that hold this machine's work rather than the system, read from the machine itself
    (so this file names none): the folder the checkout sits in (beside it ../shared, sibling
    checkouts, tool libraries) and the home folder. System folders (/etc, /var, /usr, /tmp) are fine:
    the Slurm test cluster configures them, and a scratch folder names /tmp."""
    here = [str(ROOT.parent) + "/", str(Path.home()) + "/"]
    return tuple(h for h in here if h not in ("//", "/"))


def test_no_tracked_file_names_a_machine_work_folder(tracked):
    folders = _machine_folders()
    bad = [f"{p.relative_to(ROOT)}:{i}: {line.strip()[:100]}"
           for p, lines in tracked for i, line in enumerate(lines, 1)
           if p.name != "test_repository_bounds.py" and any(f in line for f in folders)]
    assert not bad, "absolute paths of a machine's work folders (use a path relative to the repository or " \
                    "../shared, or a user-passed argument):\n" + "\n".join(bad)


def test_no_tracked_file_climbs_out_of_the_repository_except_into_shared(tracked):
    bad = [f"{p.relative_to(ROOT)}:{i}: {line.strip()[:100]}"
           for p, lines in tracked for i, line in enumerate(lines, 1)
           if p.suffix in {".py", ".sh", ".yaml", ".yml", ".toml", ".sbatch", ""} and CLIMB.search(line)
           and p.name != "test_repository_bounds.py"]  # its own planted examples
    assert not bad, "relative paths out of the repository (only ../shared may be read):\n" + "\n".join(bad)


def test_no_python_file_resolves_a_folder_above_the_repository(tracked):
    bad = []
    for p, lines in tracked:
        if p.suffix != ".py" or p.name == "test_repository_bounds.py":  # its own planted examples
            continue
        depth = len(p.relative_to(ROOT).parts) - 1  # parents[depth] is the root
        for i, line in enumerate(lines, 1):
            bad += [f"{p.relative_to(ROOT)}:{i}: parents[{n}]" for n in map(int, PARENTS.findall(line)) if n > depth
                    and "__file__" in line]
    assert not bad, "a file's parents[] above the repository root:\n" + "\n".join(bad)


def test_the_checks_see_a_planted_path(tmp_path):
    """The patterns themselves: each kind of escape is found, a ../shared path is not."""
    planted = f'KINDS = Path("{ROOT.parent}/.library/device/KINDS.md")'
    assert any(f in planted for f in _machine_folders())
    assert CLIMB.search("cat ../notes/x.md") and CLIMB.search("open('../data/x')")
    assert not CLIMB.search("path: ../shared/data/gsm8k/train.jsonl")
    assert PARENTS.findall("ROOT = Path(__file__).resolve().parents[3]") == ["3"]
