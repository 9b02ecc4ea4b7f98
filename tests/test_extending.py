"""docs/extending.md, run as a reader runs it: its file of objectives, cut from the page as printed,
is imported with --objectives, trains through train_math.py's --loss, gets a flag for its option,
has the exact gradient it claims, takes the hot path, and bad input to --objectives gets a message."""

import os
import re
import subprocess
import sys

import pytest
import torch

from nanoopd.checkpoint import save_checkpoint
from nanoopd.objectives import OBJECTIVES, SPECS, Option, load_objectives, option_flags, register
from tests.test_opd import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "extending.md")


def page_file(tmp_path) -> str:
    """The first ```python block of docs/extending.md, written to tmp_path/my_objectives.py."""
    code = re.search(r"```python\n(.*?)```", open(PAGE).read(), re.S).group(1)
    assert code.startswith("# my_objectives.py"), "the page's first code block is the file a reader saves"
    path = tmp_path / "my_objectives.py"
    path.write_text(code)
    return str(path)


@pytest.fixture
def loaded(tmp_path):
    """The page's objective, registered for one test and removed after it."""
    path = page_file(tmp_path)
    load_objectives(path)
    yield path
    OBJECTIVES.pop("my_forward_kl"), SPECS.pop("my_forward_kl")


def run(*args, timeout=180):
    return subprocess.run([sys.executable, "train_math.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_the_page_registers_its_objective_with_its_claim_and_option(loaded):
    assert SPECS["my_forward_kl"].claim == "F"
    assert SPECS["my_forward_kl"].options["floor"].default is None
    assert "floor" in option_flags() and "my_forward_kl" in option_flags()["floor"].help


@pytest.mark.parametrize("vocab", [5, 40])  # fewer tokens than a default top-K too
def test_its_gradient_is_the_exact_forward_kl_gradient(loaded, vocab):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, vocab, generator=g, dtype=torch.float64, requires_grad=True)  # (B, T, V)
    teacher = torch.randn(2, 3, vocab, generator=g, dtype=torch.float64)
    tokens = torch.randint(vocab, (2, 3), generator=g)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    loss, stats = OBJECTIVES["my_forward_kl"](student, teacher, tokens, mask)
    loss.backward()
    pi, q = student.detach().softmax(-1), teacher.softmax(-1)
    exact = (pi - q) * mask[..., None] / mask.sum()  # d F / d logits, per response token
    torch.testing.assert_close(student.grad, exact, rtol=1e-10, atol=1e-12)
    forward_kl = (q * (q.log() - pi.log())).sum(-1)  # (B, T)
    assert stats["loss"] == pytest.approx((forward_kl * mask).sum().item() / 3, rel=1e-9)


def test_it_takes_the_hot_path_and_gives_the_same_loss(loaded):
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 4, 9, generator=g), torch.randn(2, 4, 9, generator=g)  # (B, T, V)
    tokens, mask = torch.randint(9, (2, 4), generator=g), torch.ones(2, 4, dtype=torch.bool)
    cold, _ = OBJECTIVES["my_forward_kl"](student, teacher, tokens, mask, floor=-3.0)
    logp = (student.log_softmax(-1), teacher.log_softmax(-1))
    hot, stats = OBJECTIVES["my_forward_kl"](student, teacher, tokens, mask, floor=-3.0, logp=logp)
    assert torch.equal(cold, hot) and torch.is_tensor(stats["loss"])  # stats stay on the device
    with pytest.raises(ValueError, match="unknown option.*flor"):
        OBJECTIVES["my_forward_kl"](student, teacher, tokens, mask, flor=-3.0)


def readme_command() -> list[str]:
    """The README's extension example: its train_math.py command line, as the page prints it too."""
    line = next(l for l in open(os.path.join(ROOT, "README.md")) if l.startswith("python train_math.py --objectives"))
    assert line in open(PAGE).read(), "the README's command is the page's"
    return line.split()[2:]


def test_the_readmes_command_trains_it_end_to_end(tmp_path):
    path = page_file(tmp_path)
    save_checkpoint(str(tmp_path / "teacher.pt"), tiny(0, 48), 0)
    save_checkpoint(str(tmp_path / "student.pt"), tiny(1), 0)
    argv = [path if a == "my_objectives.py" else a for a in readme_command()]
    r = run(*argv, "--out_dir", str(tmp_path), "--opd_steps", "2", "--opd_batch", "4", "--max_new_tokens", "12",
            "--digits", "1", "--eval_n", "4", "--final_eval_n", "4", "--threads", "1")  # tiny, for the test
    assert r.returncode == 0, r.stderr
    assert len((tmp_path / "opd_my_forward_kl.jsonl").read_text().splitlines()) == 2
    assert "my_forward_kl {'floor': -20.0}" in r.stdout  # the generated flag reached the objective
    assert "--floor" in run("--objectives", path, "--help").stdout


def test_the_audit_finds_it_follows_the_forward_kl_it_claims(tmp_path):
    from toy.audit import main as audit
    path = page_file(tmp_path)
    try:
        rows = audit(["--objectives", path, "--no-plots", "--out", str(tmp_path / "audit")])
    finally:
        OBJECTIVES.pop("my_forward_kl", None), SPECS.pop("my_forward_kl", None)
    row = next(r for r in rows if r["objective"] == "my_forward_kl")
    assert row["follows"] == "F exactly" and row["flags"] == "-", row  # "-": no flag


def test_bad_objectives_files_get_a_message_naming_the_flag(tmp_path):
    for text, message in [(None, "no objectives file"), ("raise RuntimeError('oops')", "RuntimeError: oops"),
                          ("import nonexistent_module_xyz", "nonexistent_module_xyz")]:
        path = tmp_path / "bad.py"
        if text is not None:
            path.write_text(text)
        r = run("--objectives", str(path), "--stages", "eval")
        assert r.returncode == 2 and "--objectives" in r.stderr and message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    r = run("--loss", "my_forward_kl")  # without its file the name is unknown, and the valid ones are listed
    assert r.returncode == 2 and "--loss" in r.stderr and "full_reverse_kl" in r.stderr


def test_register_refuses_an_unknown_claim_and_a_bare_default():
    with pytest.raises(ValueError, match="claim must be one of"):
        register("x", claim="reverse")
    with pytest.raises(ValueError, match="must be an Option"):
        register("x", alpha=0.5)
    assert "x" not in OBJECTIVES


def test_one_option_name_with_two_types_is_refused():
    register("tmp_a", alpha=Option(1, "an int", int))(lambda *args, **options: None)
    register("tmp_b", alpha=Option(0.5, "a float", float))(lambda *args, **options: None)
    try:
        with pytest.raises(ValueError, match="option 'alpha'.*give them one type"):
            option_flags()
    finally:
        for name in ("tmp_a", "tmp_b"):
            OBJECTIVES.pop(name), SPECS.pop(name)
