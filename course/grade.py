"""
grade.py: run one lab's graded tests against a copy of the project and print a score per task.

    python course/grade.py kv_cache lab1    # the student copy in lab1/
    python course/grade.py kv_cache .       # the project itself: the reference, every task passes

For every task: `name: passed/total`, then each failing test with the first line of why. The exit
status is 0 only when every task passes (1 otherwise, 2 for an unknown lab or a folder that holds
no project). The tests run in DIR with DIR's own code, in one pytest process, one CPU thread (the
graded tests are tiny; one thread is the fastest on a laptop that is busy with other things).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from course.labs import Lab, get_lab  # noqa: E402


@dataclass(frozen=True)
class Result:
    passed: bool
    why: str = ""  # the first line of the failure, for a test that did not pass


def first_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def error_line(text: str | None, root: Path | None = None) -> str:
    """The exception of a pytest traceback ('E   SomeError: ...'), with the file and line it names
    (a syntax error in the student's code, say), paths relative to `root`."""
    lines = [line for line in (text or "").splitlines() if line.strip()]
    errors = [line[1:].strip() for line in lines if line.startswith("E ")]
    if not errors:
        return lines[-1].strip() if lines else ""
    raised = [e for e in errors if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", e)]
    where = [e for e in errors if e.startswith('File "')]
    why = raised[-1] if raised else errors[0]
    if where:
        why += f" ({where[0]})"
    return why.replace(f"{root.resolve()}{os.sep}", "") if root else why


NAN = re.compile(r"difference: nan|\bnan\b.*(?:not close|allclose)|tensor\(\[?nan|Expected .*nan", re.IGNORECASE)


def failure_line(message: str | None, text: str | None) -> str:
    """The first line of why a test failed. A bare `assert ...` or a generic torch message says
    little, so the failing line of the test's source comes with it; a NaN is named first; a
    `pytest.raises(match=...)` that did not match shows the pattern expected and the message got."""
    why = first_line(message) or error_line(text)
    body = (message or "") + "\n" + (text or "")
    if why.startswith("AssertionError: Regex pattern did not match"):
        expected = re.search(r"Expected regex: (.+)", body)
        got = re.search(r"Actual message: (.+)", body)
        if expected:
            return (f"the error message must match {expected.group(1).strip()}, got "
                    f"{got.group(1).strip() if got else 'another message'}")
    if NAN.search(body) and "nan" not in why.lower().split(":")[0]:
        why = f"NaN in your result (a -inf mask over a whole row, log 0, 0/0?): {why}"
    source = [line[1:].strip() for line in (text or "").splitlines() if line.startswith(">")]
    if source and why.startswith("assert "):
        return f"failed: {source[-1]}"
    if source and "Tensor-likes are not" in why or source and "Scalars are not" in why:
        return f"{why} at: {source[-1]}"
    return why


def check_project(path: Path, lab: Lab) -> None:
    """ValueError unless `path` holds a copy of the project with the lab's test files."""
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder; make a copy with python course/make_lab.py {lab.name} {path}")
    if not (path / "nanoopd" / "__init__.py").is_file() or not (path / "tests" / "conftest.py").is_file():
        raise ValueError(f"{path} holds no nanoopd project (no nanoopd/__init__.py or tests/conftest.py); "
                         f"make a copy with python course/make_lab.py {lab.name} {path}")
    missing = sorted({t.split("::")[0] for t in lab.tests if not (path / t.split("::")[0]).is_file()})
    if missing:
        raise ValueError(f"{path} has no {', '.join(missing)}: it is not a copy of this version of the project; "
                         f"make a fresh one with python course/make_lab.py {lab.name} DIR")


def run_tests(path: Path, node_ids: list[str] | tuple[str, ...], timeout: float = 600) -> tuple[dict, str]:
    """Run the tests in the project at `path`. Returns ({node id: Result}, a note on anything that
    kept tests from running: '' when pytest ran)."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "results.xml"
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        env.pop("PYTHONPATH", None)  # DIR's own code, nothing else
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *node_ids]
        try:
            proc = subprocess.run(cmd, cwd=path, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {}, f"the tests did not finish within {timeout:.0f} s (an endless loop?)"
        if not xml.exists():
            output = proc.stdout + proc.stderr
            if "No module named pytest" in output:
                return {}, "pytest is not installed: pip install -r requirements.txt"
            return {}, f"pytest could not run: {first_line(proc.stderr) or first_line(proc.stdout)}"
        results, notes = {}, {}  # notes: {why a test file could not be imported: [those files]}
        for case in ET.parse(xml).getroot().iter("testcase"):
            classname, name = case.get("classname", ""), case.get("name", "")
            failure = case.find("failure")
            if failure is None:
                failure = case.find("error")
            if not classname:  # a test file that could not even be imported
                why = error_line(failure.text if failure is not None else "", path)
                notes.setdefault(why, []).append(name.replace(".", "/") + ".py")
                continue
            node = classname.replace(".", "/") + ".py::" + name
            if failure is not None:
                results[node] = Result(False, failure_line(failure.get("message"), failure.text))
            elif case.find("skipped") is not None:
                results[node] = Result(False, "skipped: " + first_line(case.find("skipped").get("message")))
            else:
                results[node] = Result(True)
        note = "; ".join(f"{', '.join(files)}: {why}" for why, files in notes.items())
        if not results and not note:  # pytest ran nothing: a graded test that this copy lacks, say
            output = (proc.stdout + proc.stderr).replace(f"{path.resolve()}{os.sep}", "")
            missing = re.findall(r"ERROR: not found: (\S+)", output)
            note = (f"not in this copy: {', '.join(missing)} (a copy of another version? make a fresh one)"
                    if missing else first_line(output) or "no test ran")
        return results, note


def select(results: dict, node_id: str) -> dict:
    """The results of one graded test: the node itself, or all its parametrised cases."""
    return {k: v for k, v in results.items() if k == node_id or k.startswith(node_id + "[")}


def score(lab: Lab, results: dict, note: str = "") -> tuple[str, bool]:
    """The report of `lab` from test results, and whether every task passed."""
    lines, tasks_passed, n_passed, n_total = [], 0, 0, 0
    width = max(len(task.name) for task in lab.tasks) + 1
    for task in lab.tasks:
        outcomes = {}
        for node_id in task.tests:
            found = select(results, node_id)
            outcomes.update(found or {node_id: Result(False, "did not run" if note else "did not run: test not found")})
        passed = sum(r.passed for r in outcomes.values())
        n_passed, n_total = n_passed + passed, n_total + len(outcomes)
        tasks_passed += passed == len(outcomes)
        lines.append(f"{task.name + ':':<{width}} {f'{passed}/{len(outcomes)}':>5}   {task.checks}")
        for node, r in outcomes.items():
            if not r.passed:
                lines.append(f"    FAIL {node}")
                lines.append(f"         {r.why}")
    if note:
        lines.insert(0, f"some tests could not run: {note}")
    ok = tasks_passed == len(lab.tasks)
    verdict = "every task passes" if ok else f"not done yet: see {lab.handout}"
    lines.append(f"score: {tasks_passed}/{len(lab.tasks)} tasks, {n_passed}/{n_total} tests; {verdict}")
    return "\n".join(lines), ok


def grade(lab: Lab, path: Path, timeout: float = 600) -> tuple[str, bool]:
    check_project(path, lab)
    results, note = run_tests(path, lab.tests, timeout)
    report, ok = score(lab, results, note)
    return f"lab {lab.name}: {lab.title}\nin {path}\n{report}", ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Grade one lab of the course on a copy of the project.",
                                epilog="The labs: python course/make_lab.py --list")
    p.add_argument("lab", help="the lab's name")
    p.add_argument("dir", help="the copy to grade (made by make_lab.py); '.' for the project itself")
    p.add_argument("--timeout", type=float, default=600, help="seconds before the tests are stopped (default 600)")
    args = p.parse_args(argv)
    try:
        lab = get_lab(args.lab)
        report, ok = grade(lab, Path(args.dir), args.timeout)
    except ValueError as e:
        print(f"grade.py: error: {e}", file=sys.stderr)
        return 2
    print(report)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
