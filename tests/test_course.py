"""The course kit itself (course/): the registry and the markers agree, make_lab.py and grade.py
behave as their pages say, the project passes every lab, a fresh copy of a lab fails that lab's
graded tests and only those, and every mutant (a classic mistake) is caught with its message.

The graders run in subprocesses, one pytest process per copy, on the union of all labs' graded
tests: about 40 s on a quiet 2-core VM in all (70 s with other jobs running beside it).
"""

import functools
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from course import grade, make_lab  # noqa: E402
from course.labs import LABS, get_lab  # noqa: E402
from course.mutants import MUTANTS, apply  # noqa: E402

UNION = [t for lab in LABS for t in lab.tests]
NAMES = [lab.name for lab in LABS]


def run_script(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def task_lines(report: str) -> dict[str, tuple[int, int]]:
    """{task: (passed, total)} from a grader report."""
    out = {}
    for line in report.splitlines():
        head = line.split()[:2] if line and not line.startswith(" ") else []
        if len(head) == 2 and head[0].endswith(":") and "/" in head[1]:
            passed, total = head[1].split("/")
            out[head[0][:-1]] = (int(passed), int(total))
    return out


@functools.cache
def project_results():
    results, note = grade.run_tests(ROOT, UNION)
    assert not note, note
    return results


# ----------------------------------------------------------------------------------------------
# the registry, the markers, the handouts, the mutants


def test_every_lab_has_marked_code_a_handout_tasks_and_mutants():
    assert len(LABS) >= 5 and len(set(NAMES)) == len(NAMES)
    for lab in LABS:
        assert make_lab.lab_regions(ROOT, lab), lab.name  # raises when a lab has no markers
        assert (ROOT / lab.handout).is_file(), lab.handout
        assert lab.tasks and all(task.tests for task in lab.tasks), lab.name
        assert len({task.name for task in lab.tasks}) == len(lab.tasks), lab.name
        assert len(MUTANTS[lab.name]) >= 2, lab.name
        for mutant in MUTANTS[lab.name]:
            assert mutant.task in {task.name for task in lab.tasks}, (lab.name, mutant.mistake)
    assert set(MUTANTS) == set(NAMES)
    page = (ROOT / "course" / "README.md").read_text().replace("\\|", "|")
    missing = [m.mistake for mutants in MUTANTS.values() for m in mutants if m.mistake not in page]
    assert not missing, f"course/README.md does not list these mutants: {missing}"
    assert all(f"`{name}`" in page for name in NAMES)
    assert len(set(UNION)) == len(UNION), "a graded test belongs to one lab only"
    with pytest.raises(ValueError, match="unknown lab 'nope'.*kv_cache"):
        get_lab("nope")


def test_markers_pair_up_and_blanking_keeps_the_indentation():
    text = "def f(x):\n    '''doc'''\n    # lab:demo begin\n    y = x + 1\n    return y\n    # lab:demo end\n"
    lab = make_lab.Lab("demo", "Demo", "course/labs/demo.md", ())
    blanked, functions = make_lab.blank(text, lab)
    assert functions == ["f"]
    assert blanked.splitlines()[3].startswith("    raise NotImplementedError('lab demo: write f")
    namespace = {}
    exec(blanked, namespace)
    with pytest.raises(NotImplementedError, match="course/labs/demo.md"):
        namespace["f"](1)
    for broken in (text.replace("    # lab:demo end\n", ""), text.replace("    # lab:demo end", "  # lab:demo end")):
        with pytest.raises(ValueError, match="lab:demo"):
            make_lab.find_regions(broken)


def test_each_mutant_edits_its_labs_marked_code_once(tmp_path):
    for lab in LABS:
        for path in make_lab.lab_regions(ROOT, lab):
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).write_text((ROOT / path).read_text())
    for name, mutants in MUTANTS.items():
        for mutant in mutants:
            path = apply(tmp_path, name, mutant)
            assert mutant.new in (tmp_path / path).read_text()
            (tmp_path / path).write_text((ROOT / path).read_text())  # back to the reference


# ----------------------------------------------------------------------------------------------
# the command lines


def test_list_prints_one_lab_a_line_name_first():
    out = run_script("course/make_lab.py", "--list")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split()[0] for line in lines] == NAMES
    assert all(lab.title in line for lab, line in zip(LABS, lines))


def test_make_lab_writes_the_copy_and_refuses_a_folder_that_is_not_empty(tmp_path):
    dest = tmp_path / "lab"
    out = run_script("course/make_lab.py", "topk", str(dest))
    assert out.returncode == 0, out.stderr
    assert "topk_unnormalized" in out.stdout and "python course/grade.py topk" in out.stdout
    topk = (dest / "nanoopd" / "topk.py").read_text()
    assert topk.count("raise NotImplementedError('lab topk: write topk_") == 3
    assert topk.count("# lab:topk begin") == 3  # the markers stay
    assert (dest / "nanoopd" / "objectives.py").read_text() == (ROOT / "nanoopd" / "objectives.py").read_text()
    assert not (dest / "course" / "mutants.py").exists() and not (dest / "tests" / "test_course.py").exists()
    assert not (dest / "course" / "README.md").exists()  # the instructor's page lists the classic mistakes
    assert (dest / "tests" / "test_course_graders.py").exists() and (dest / get_lab("topk").handout).exists()
    again = run_script("course/make_lab.py", "topk", str(dest))
    assert again.returncode != 0 and "not empty" in again.stderr and "--force" in again.stderr
    assert run_script("course/make_lab.py", "topk", str(dest), "--force").returncode == 0
    unknown = run_script("course/make_lab.py", "nope", str(tmp_path / "other"))
    assert unknown.returncode != 0 and "unknown lab 'nope'" in unknown.stderr
    itself = run_script("course/make_lab.py", "topk", str(ROOT), "--force")
    assert itself.returncode != 0 and "holds the project itself" in itself.stderr


def test_grade_refuses_an_unknown_lab_and_a_folder_without_a_project(tmp_path):
    unknown = run_script("course/grade.py", "nope", ".")
    assert unknown.returncode == 2 and "unknown lab 'nope'" in unknown.stderr and "--list" in unknown.stderr
    empty = run_script("course/grade.py", "topk", str(tmp_path))
    assert empty.returncode == 2 and "holds no nanoopd project" in empty.stderr
    missing = run_script("course/grade.py", "topk", str(tmp_path / "missing"))
    assert missing.returncode == 2 and "not a folder" in missing.stderr


def test_grade_on_the_project_and_on_a_fresh_copy(tmp_path):
    lab = get_lab("opsd")
    n_tests = len(lab.tests)
    ok = run_script("course/grade.py", lab.name, ".")
    assert ok.returncode == 0, ok.stdout
    assert f"score: {len(lab.tasks)}/{len(lab.tasks)} tasks, {n_tests}/{n_tests} tests" in ok.stdout
    make_lab.make_copy(lab, tmp_path / "copy")
    fresh = run_script("course/grade.py", lab.name, str(tmp_path / "copy"))
    assert fresh.returncode == 1
    assert f"score: 0/{len(lab.tasks)} tasks, 0/{n_tests} tests" in fresh.stdout
    assert "NotImplementedError: lab opsd: write pi_text" in fresh.stdout
    broken = tmp_path / "copy" / "nanoopd" / "self_distill.py"  # a student's syntax error: named, with its line
    broken.write_text(broken.read_text().replace("raise NotImplementedError(", "raise NotImplementedError((", 1))
    syntax = run_script("course/grade.py", lab.name, str(tmp_path / "copy"))
    assert syntax.returncode == 1 and "SyntaxError" in syntax.stdout and "nanoopd/self_distill.py" in syntax.stdout


# ----------------------------------------------------------------------------------------------
# the project passes every lab; a fresh copy fails its own lab's graded tests, and only those


def test_the_project_passes_every_lab():
    for lab in LABS:
        report, ok = grade.score(lab, project_results())
        assert ok, report


@pytest.mark.parametrize("name", NAMES)
def test_a_fresh_copy_fails_exactly_its_own_labs_graded_tests(name, tmp_path):
    lab = get_lab(name)
    make_lab.make_copy(lab, tmp_path)
    results, note = grade.run_tests(tmp_path, UNION)
    assert not note, note
    assert set(results) == set(project_results()), "the copy ran other tests than the project"
    for other in LABS:
        report, ok = grade.score(other, results)
        if other is lab:
            assert all(passed == 0 for passed, _ in task_lines(report).values()), report
            assert report.count(f"NotImplementedError: lab {name}: write") == len(select_all(lab, results)), report
        else:
            assert ok, f"blanking lab {name} broke lab {other.name}'s graded tests:\n{report}"


def select_all(lab, results):
    return [k for t in lab.tests for k in grade.select(results, t)]


# ----------------------------------------------------------------------------------------------
# the mutants: each fails its lab's grader, on its task, with a message that names the mistake


@pytest.mark.parametrize("index", range(max(len(m) for m in MUTANTS.values())))
def test_mutants_are_caught(index, tmp_path):
    """Mutant `index` of every lab, applied together to one copy. This is the same as one copy per
    mutant because each graded test runs its own lab's marked code only: a fresh copy of any lab
    fails its own lab's graded tests and no other (the test above), which is also why only the
    graded tests of the labs that have a mutant at this index are run."""
    for path in make_lab.project_files(ROOT):
        if path not in make_lab.KIT_ONLY:
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).write_bytes((ROOT / path).read_bytes())
    applied = {name: mutants[index] for name, mutants in MUTANTS.items() if index < len(mutants)}
    for name, mutant in applied.items():
        apply(tmp_path, name, mutant)
    results, note = grade.run_tests(tmp_path, [t for lab in LABS if lab.name in applied for t in lab.tests])
    assert not note, note
    for lab in LABS:
        if lab.name not in applied:
            continue
        report, ok = grade.score(lab, results)
        mutant = applied[lab.name]
        passed, total = task_lines(report)[mutant.task]
        assert not ok and passed < total, f"lab {lab.name}: the mutant '{mutant.mistake}' passes the grader:\n{report}"
        assert mutant.expect in report, f"lab {lab.name}: '{mutant.mistake}' is caught, but not by its message:\n{report}"


# ----------------------------------------------------------------------------------------------
# the demos the handouts print, on the reference: what the handouts say they show




def test_the_demos_show_what_the_handouts_say(one_thread, capsys):
    from course.demos import geometric_mean, kv_speed, on_policy, rlvr_easy, special_token, topk_drain
    kv = kv_speed.main(batch=4, new_tokens=16)
    assert kv["same"] and kv["gap"] < 1e-4
    table = topk_drain.main(steps=(0, 200))["table"]
    (kl0, mass0), (kl, mass) = table["topk_unnormalized"]
    assert kl > 2 * kl0 and mass < mass0 - 0.2  # the true KL climbs while the mass drains out of S
    assert all(rows[-1][0] < rows[0][0] for name, rows in table.items() if name != "topk_unnormalized")
    tokens = special_token.main()
    assert tokens[False]["share_grad"] > 0.95 and tokens[True]["share_grad"] == 0 and tokens[True]["max_abs"] < 2
    for name, case in geometric_mean.main().items():
        assert (case["learned"] - case["geometric"]).abs().max() < 1e-3, name
    instance = geometric_mean.main()["instance-specific (answer)"]
    assert (instance["geometric"][3:] > 3 * instance["arithmetic"][3:]).all()
    demo = rlvr_easy.main()
    before, after = demo["sft"]
    assert after < 0.6 * before and demo["rlvr"][-1][2] > 0.9
    flops = on_policy.main()  # {(lmbda, teacher_rows, step): (charged, given)}
    assert all((charged == given) == (lmbda == 1 or step == 1) for (lmbda, _, step), (charged, given) in flops.items())
    assert flops[(0.0, "fresh", 0)][1] < flops[(0.5, "fresh", 0)][1] < flops[(1.0, "fresh", 0)][1]  # the student samples less
    assert flops[(0.0, "pool", 0)][1] == flops[(0.0, "pool", 1)][1]  # the same traces: the same compute
    from course.demos import cross_tokenizer
    xt = cross_tokenizer.main()
    assert abs(xt["sum"] - xt["path"]) < 1e-12  # the chunk log-ratios sum to the paths' log-ratio
    assert xt[("free", "gamma=1")] == "P exactly" and xt[("canonical", "gamma=1")] == "P = X exactly"
    assert "speed-up" in capsys.readouterr().out


def handout_listing(handout: str, command: str) -> list[str]:
    """The lines of the first listing after `command` in a handout (its expected output)."""
    text = (ROOT / handout).read_text()
    start = text.index("```\n", text.index("```", text.index(command)) + 3) + 4
    return text[start:text.index("```", start)].rstrip("\n").split("\n")


@pytest.mark.parametrize("lab,demo", [("topk", "topk_drain"), ("masking", "special_token"),
                                      ("opsd", "geometric_mean"), ("rlvr", "rlvr_easy"),
                                      ("on_policy", "on_policy"), ("cross_tokenizer", "cross_tokenizer")])
def test_the_handouts_print_what_a_fresh_run_of_their_demo_prints(lab, demo, one_thread, capsys):
    """Every deterministic demo's listing is its whole printout, digit for digit (kv_speed prints
    timings, checked above)."""
    import importlib
    importlib.import_module(f"course.demos.{demo}").main()
    printed = capsys.readouterr().out.rstrip("\n").split("\n")
    assert handout_listing(get_lab(lab).handout, f"python course/demos/{demo}.py") == printed


def test_a_copy_made_inside_the_project_is_not_part_of_the_next_copy(tmp_path):
    for path in ("nanoopd/model.py", "course/make_lab.py", "lab1/course/make_lab.py", "lab1/nanoopd/model.py",
                 "out/run.jsonl", ".venv/bin/python"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("")
    assert make_lab.project_files(tmp_path) == ["course/make_lab.py", "nanoopd/model.py"]
