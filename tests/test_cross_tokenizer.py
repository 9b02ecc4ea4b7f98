"""The building blocks of cross-tokenizer OPD (nanoopd/cross_tokenizer.py), exactly: the groups
partition both tokenizations into equal byte spans, texts that differ are refused at the byte where
they part, one tokenizer on both sides gives one-token chunks and the token log-ratios to the bit,
chunk log-ratios sum to the path log-ratio, ULD is blind to a permutation of the vocabulary, and
GOLD's observed merge by hand."""

import random

import pytest
import torch

from nanoopd.cross_tokenizer import align, chunk_logratios, merge_observed, uld


def pieces(text: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0] + sorted(set(cuts)) + [len(text)]
    return [text[x:y] for x, y in zip(edges, edges[1:]) if y > x]


def test_groups_partition_both_tokenizations_into_equal_byte_spans():
    rng = random.Random(0)
    for _ in range(200):
        text = bytes(rng.randrange(48, 58) for _ in range(rng.randint(1, 30)))
        a = pieces(text, [rng.randint(1, len(text)) for _ in range(rng.randint(0, 10))])
        b = pieces(text, [rng.randint(1, len(text)) for _ in range(rng.randint(0, 10))])
        groups = align(a, b)
        assert [g[0] for g in groups] == [0] + [g[1] for g in groups[:-1]] and groups[-1][1] == len(a)
        assert [g[2] for g in groups] == [0] + [g[3] for g in groups[:-1]] and groups[-1][3] == len(b)
        for i0, i1, j0, j1 in groups:
            assert i1 > i0 and j1 > j0 and b"".join(a[i0:i1]) == b"".join(b[j0:j1])
        # a group closes at every byte where both sides end, and only there
        ends = lambda p: {sum(map(len, p[:k])) for k in range(1, len(p) + 1)}
        assert [sum(map(len, a[:g[1]])) for g in groups] == sorted(ends(a) & ends(b))


def test_digits_against_multi_digit_tokens():
    a = [b"3", b"4", b"7", b"+", b"2", b"8", b"5"]
    b = [b"347", b"+", b"28", b"5"]
    assert align(a, b) == [(0, 3, 0, 1), (3, 4, 1, 2), (4, 6, 2, 3), (6, 7, 3, 4)]


def test_texts_that_differ_are_refused_where_they_part():
    with pytest.raises(ValueError, match=r"part at byte 2 \(b'9' against b'7'\)"):
        align([b"34", b"9"], [b"3", b"47"])
    with pytest.raises(ValueError, match=r"part at byte 2 \(b'7' against b''\)"):
        align([b"347"], [b"34"])


def test_one_tokenizer_on_both_sides_gives_the_token_logratios_to_the_bit():
    torch.manual_seed(0)
    a = [b"1", b"2", b"+", b"3"]
    groups = align(a, list(a))
    assert groups == [(k, k + 1, k, k + 1) for k in range(4)]
    ls, lt = torch.randn(4).log_softmax(0), torch.randn(4).log_softmax(0)
    r, per_piece = chunk_logratios(groups, ls, lt)
    assert torch.equal(r, ls - lt) and torch.equal(per_piece, ls - lt)


def test_chunk_logratios_sum_to_the_path_logratio_and_spread_exactly():
    torch.manual_seed(1)
    a = [b"3", b"4", b"7", b"+", b"2", b"8", b"5"]
    b = [b"347", b"+", b"28", b"5"]
    ls = -torch.rand(len(a), dtype=torch.float64) * 3
    lt = -torch.rand(len(b), dtype=torch.float64) * 3
    groups = align(a, b)
    r, per_piece = chunk_logratios(groups, ls, lt)
    assert r.sum().item() == pytest.approx(ls.sum().item() - lt.sum().item(), abs=1e-12)
    assert r[0].item() == pytest.approx((ls[0] + ls[1] + ls[2] - lt[0]).item(), abs=1e-12)
    for g, (i0, i1, _, _) in enumerate(groups):
        assert per_piece[i0:i1].sum().item() == pytest.approx(r[g].item(), abs=1e-12)


def test_uld_is_blind_to_which_token_is_which():
    torch.manual_seed(2)
    p, q = torch.rand(5).softmax(0), torch.rand(7).softmax(0)
    d = uld(p, q)
    assert uld(p[torch.randperm(5)], q[torch.randperm(7)]).item() == pytest.approx(d.item(), abs=1e-7)
    swapped = torch.tensor([0.1, 0.9])
    assert uld(torch.tensor([0.9, 0.1]), swapped).item() == pytest.approx(0.0, abs=1e-7)  # opposite answers, distance 0
    ps, qs = p.sort(descending=True).values, q.sort(descending=True).values
    assert d.item() == pytest.approx((torch.cat([ps, torch.zeros(2)]) - qs).abs().sum().item(), abs=1e-7)


def test_golds_observed_merge_by_hand():
    probs = torch.tensor([[.6, .3, .1], [.2, .5, .3]])
    assert merge_observed(probs, [0, 1]).tolist() == pytest.approx([.30, .15, .05])
    with pytest.raises(ValueError, match="one observed token per position"):
        merge_observed(probs, [0])
