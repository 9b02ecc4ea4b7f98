import os
import sys

import pytest
import torch

# tests run from any folder, on the CPU, with few threads (CI machines have 2 cores)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for the module that asks for it: the toys and the course demos are many
    tiny operators (as they run from the command line), and thread hand-offs cost more than they
    gain on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_pairs(root) -> None:
    """Three tiny teacher/student pairs where an experiment's --pairs 3 looks for them (pipeline
    seeds 1337, 2337, 3337 under root), each with its own random weights."""
    from nanoopd.checkpoint import save_checkpoint
    from nanoopd.model import GPT, GPTConfig
    from nanoopd.tokenizer import get_tokenizer

    def tiny(seed: int, n_embd: int) -> GPT:
        torch.manual_seed(seed)
        return GPT(GPTConfig(vocab_size=get_tokenizer().n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=n_embd))

    for i, folder in enumerate((root, root / "pair2337", root / "pair3337")):
        folder.mkdir(parents=True, exist_ok=True)
        save_checkpoint(str(folder / "teacher.pt"), tiny(10 + i, 48), 0)
        save_checkpoint(str(folder / "student.pt"), tiny(20 + i, 16), 0)


def run_on_tiny_pairs(tmp_path_factory, name: str, main, flags: list) -> tuple:
    """An experiment's main on three tiny pairs in a fresh folder: (that folder, its <name>.json)."""
    import json
    root = tmp_path_factory.mktemp(name)
    tiny_pairs(root)
    main(["--out_dir", str(root)] + flags)
    return root, json.loads((root / name / f"{name}.json").read_text())


def rerun(module, root, flags: list, capsys, monkeypatch) -> str:
    """An experiment (its module) started again with the same flags, where training a teacher again
    fails the test; what it printed."""
    monkeypatch.setattr(module, "train_teacher", lambda *a: pytest.fail("a finished teacher was trained again"))
    module.main(["--out_dir", str(root)] + flags)
    return capsys.readouterr().out
