"""
make_lab.py: write a student copy of the project for one lab.

    python course/make_lab.py --list              # the labs, one a line: name, then title
    python course/make_lab.py kv_cache lab1       # a copy in lab1/ with KVCache.write to write
    python course/make_lab.py kv_cache lab1 --force   # write over a copy that is already there

In the copy, the code between a lab's markers in the library,

    # lab:<name> begin
    # lab:<name> end

is replaced by `raise NotImplementedError(...)` that names the function and the handout; the
markers stay, so the student sees where the code goes. Everything else is copied as it is: the
library stays the reference solution and nothing is written twice. The instructor-only files
(the mutants, which hold pieces of the reference solutions, the kit's own tests, and the
instructor's page course/README.md, which lists every lab's classic mistakes) are left out.

What is copied: the files git tracks plus the untracked ones it does not ignore, when the project is
a git checkout; otherwise every file except .git, .venv, out/, runs/ and caches.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from course.labs import LABS, Lab, get_lab  # noqa: E402

MARKER = re.compile(r"^(?P<indent>[ \t]*)# lab:(?P<lab>\w+) (?P<edge>begin|end)[ \t]*$")
KIT_ONLY = ("course/mutants.py", "tests/test_course.py", "course/README.md")  # never in a student copy
# (course/README.md is the instructor's page: it lists every lab's classic mistakes and their messages)
SKIP_DIRS = {".git", ".venv", "venv", "out", "runs", "__pycache__", ".pytest_cache"}
SKIP_SUFFIXES = (".pyc", ".pt", ".tmp")


@dataclass(frozen=True)
class Region:
    lab: str
    begin: int      # 0-based line index of the begin marker
    end: int        # 0-based line index of the end marker
    indent: str     # the markers' indentation: the raise goes there
    function: str   # the enclosing function, e.g. 'KVCache.write'


def library_file(path: str) -> bool:
    """Python files that may hold markers: everything but the tests and the kit itself."""
    return path.endswith(".py") and not path.startswith(("tests/", "course/"))


def enclosing_function(lines: list[str], index: int, indent: str) -> str:
    """'Class.method' or 'function' of the def that encloses line `index`."""
    name, width = "", len(indent)
    for line in reversed(lines[:index]):
        m = re.match(r"^([ \t]*)(def|class) (\w+)", line)
        if m and len(m.group(1)) < width:
            if m.group(2) == "def" and not name:
                name, width = m.group(3), len(m.group(1))
            elif m.group(2) == "class" and name:
                return f"{m.group(3)}.{name}"
            if len(m.group(1)) == 0:
                break
    return name or "<module>"


def find_regions(text: str, path: str = "<text>") -> list[Region]:
    """Every marked region of `text`; ValueError on a marker without its pair."""
    lines = text.split("\n")
    regions, open_ = [], None
    for i, line in enumerate(lines):
        m = MARKER.match(line)
        if not m:
            continue
        lab, edge, indent = m.group("lab"), m.group("edge"), m.group("indent")
        if edge == "begin":
            if open_ is not None:
                raise ValueError(f"{path}:{i + 1}: 'lab:{lab} begin' inside the open region of line {open_[0] + 1}")
            open_ = (i, lab, indent)
        else:
            if open_ is None or open_[1] != lab or open_[2] != indent:
                raise ValueError(f"{path}:{i + 1}: 'lab:{lab} end' without a matching begin at the same indentation")
            regions.append(Region(lab, open_[0], i, indent, enclosing_function(lines, open_[0], indent)))
            open_ = None
    if open_ is not None:
        raise ValueError(f"{path}:{open_[0] + 1}: 'lab:{open_[1]} begin' is never closed")
    return regions


def blank(text: str, lab: Lab, path: str = "<text>") -> tuple[str, list[str]]:
    """`text` with every region of `lab` replaced by a raise; and the functions blanked."""
    lines = text.split("\n")
    regions = [r for r in find_regions(text, path) if r.lab == lab.name]
    for r in reversed(regions):
        message = f"lab {lab.name}: write {r.function} (between the lab:{lab.name} markers), see {lab.handout}"
        lines[r.begin + 1:r.end] = [f"{r.indent}raise NotImplementedError({message!r})"]
    return "\n".join(lines), [r.function for r in regions]


def project_files(root: Path) -> list[str]:
    """The project's files, as paths relative to root with '/' separators. A student copy made
    inside the project (a folder holding its own course/make_lab.py) is not part of it."""
    files = None
    if (root / ".git").exists():
        try:
            out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                 cwd=root, capture_output=True, check=True).stdout
            files = sorted({p for p in out.decode().split("\0") if p and (root / p).is_file()})  # not deleted ones
        except (OSError, subprocess.CalledProcessError):
            pass  # no git on this machine: walk instead
    if files is None:
        files = []
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
            files += [(Path(folder) / n).relative_to(root).as_posix() for n in sorted(names) if not n.endswith(SKIP_SUFFIXES)]
    copies = tuple(p[:-len("course/make_lab.py")] for p in files if p.endswith("/course/make_lab.py"))
    return [p for p in files if not p.startswith(copies)] if copies else files


def lab_regions(root: Path, lab: Lab) -> dict[str, list[Region]]:
    """{library file: its regions of `lab`}; ValueError when the lab has none."""
    found = {}
    for path in project_files(root):
        if library_file(path):
            regions = [r for r in find_regions((root / path).read_text(), path) if r.lab == lab.name]
            if regions:
                found[path] = regions
    if not found:
        raise ValueError(f"lab {lab.name!r} has no '# lab:{lab.name} begin' / 'end' markers in the library")
    return found


def make_copy(lab: Lab, dest: Path, root: Path = ROOT, force: bool = False) -> list[tuple[str, str]]:
    """Write the student copy of `lab` into dest. Returns [(file, function blanked)]."""
    dest = Path(dest)
    root, target = root.resolve(), dest.resolve()
    if target == root or root.is_relative_to(target):
        raise ValueError(f"{dest} holds the project itself: choose another folder for the copy")
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"{dest} exists and is not a folder")
    if dest.exists() and any(dest.iterdir()) and not force:
        raise ValueError(f"{dest} exists and is not empty; choose an empty folder, or add --force to write "
                         f"the copy over it (files of the same name are replaced, work there is lost)")
    regions = lab_regions(root, lab)  # fails before anything is written
    blanked = []
    for path in project_files(root):
        if path in KIT_ONLY or (target.is_relative_to(root) and (root / path).resolve().is_relative_to(target)):
            continue
        out = dest / path
        out.parent.mkdir(parents=True, exist_ok=True)
        if path in regions:
            text, functions = blank((root / path).read_text(), lab, path)
            compile(text, path, "exec")  # a marker at the wrong indentation fails here, not in class
            out.write_text(text)
            blanked += [(path, f) for f in functions]
        else:
            shutil.copyfile(root / path, out)
            shutil.copymode(root / path, out)
    return blanked


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write a student copy of the project for one lab of the course.",
                                epilog="The handouts are in course/labs/; grade a copy with python course/grade.py LAB DIR.")
    p.add_argument("lab", nargs="?", help="the lab's name (see --list)")
    p.add_argument("dir", nargs="?", help="folder for the copy: new or empty, unless --force")
    p.add_argument("--list", action="store_true", help="print the labs, one a line: name, then title")
    p.add_argument("--force", action="store_true", help="write over a folder that is not empty")
    args = p.parse_args(argv)
    if args.list:
        width = max(len(lab.name) for lab in LABS)
        for lab in LABS:
            print(f"{lab.name:<{width}}  {lab.title}")
        return 0
    if not args.lab or not args.dir:
        p.print_usage(sys.stderr)
        print("make_lab.py: error: give a lab and a folder (or --list)", file=sys.stderr)
        return 2
    try:
        lab = get_lab(args.lab)
        blanked = make_copy(lab, Path(args.dir), force=args.force)
    except ValueError as e:
        print(f"make_lab.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote the student copy for lab {lab.name} ({lab.title}) to {args.dir}")
    for path, function in blanked:
        print(f"  to write: {function}  ({path})")
    print(f"handout: {args.dir}/{lab.handout}")
    print(f"grade:   python course/grade.py {lab.name} {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
