"""Property tests of the partition schemes against Python-int definitions and brute-force enumeration."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import reference_classes
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from torchrec_qr import (
    ChineseRemainder,
    ExplicitPartitions,
    MixedRadix,
    Partition,
    QuotientRemainder,
    balanced_radices,
    coprime_moduli,
)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX_ID = 2**62 - 1
PRIMES = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31]


def assert_complementary(p: Partition, n: int) -> None:
    """Indices match the Python definition, lie in ``sizes(n)``, and no two ids share all classes."""
    idx = p.indices(torch.arange(n))
    sizes = p.sizes(n)
    assert idx.shape == (p.num_partitions, n) and idx.dtype == torch.int64
    assert len(sizes) == p.num_partitions
    for j, size in enumerate(sizes):
        assert int(idx[j].min()) >= 0 and int(idx[j].max()) < size, (j, size)
    tuples = [tuple(col) for col in idx.T.tolist()]
    assert tuples == [reference_classes(p, i) for i in range(n)]
    # Encode each k-tuple as one integer (mixed radix over the sizes): equal codes <=> equal tuples.
    codes = set()
    for t in tuples:
        code = 0
        for c, size in zip(t, sizes):
            code = code * size + c
        codes.add(code)
    assert len(codes) == n
    p.validate(n)  # must not raise


def collision_from_message(err: pytest.ExceptionInfo) -> tuple[int, int]:
    m = re.search(r"ids (\d+) and (\d+)", str(err.value))
    assert m, str(err.value)
    return int(m.group(1)), int(m.group(2))


def assert_reported_pair_collides(p: Partition, n: int, classes) -> None:
    with pytest.raises(ValueError, match="not complementary") as err:
        p.validate(n)
    a, b = collision_from_message(err)
    assert a != b and 0 <= a < n and 0 <= b < n
    assert classes(a) == classes(b)


# --- complementarity on small N ------------------------------------------------------------------------------


@SETTINGS
@given(n=st.integers(1, 3000), c=st.integers(1, 200))
def test_quotient_remainder_complementary(n, c):
    p = QuotientRemainder(c)
    assert p.sizes(n) == [-(-n // c), min(c, n)]  # at most N remainder rows
    assert_complementary(p, n)


@SETTINGS
@given(radices=st.lists(st.integers(1, 16), min_size=1, max_size=4), data=st.data())
def test_mixed_radix_complementary(radices, data):
    prod = math.prod(radices)
    n = data.draw(st.integers(1, min(prod, 4000)))
    assert_complementary(MixedRadix(tuple(radices)), n)


@SETTINGS
@given(n=st.integers(1, 5000), k=st.integers(1, 4))
def test_mixed_radix_balanced_complementary(n, k):
    p = MixedRadix.balanced(n, k)
    assert p.num_partitions == k
    assert_complementary(p, n)


@SETTINGS
@given(primes=st.lists(st.sampled_from(PRIMES), min_size=1, max_size=3, unique=True), data=st.data())
def test_chinese_remainder_complementary(primes, data):
    moduli = tuple(q ** data.draw(st.integers(1, 2)) for q in primes)  # prime powers: pairwise coprime
    n = data.draw(st.integers(1, min(math.prod(moduli), 4000)))
    assert_complementary(ChineseRemainder(moduli), n)


@SETTINGS
@given(n=st.integers(1, 5000), k=st.integers(1, 4))
def test_chinese_remainder_balanced_complementary(n, k):
    p = ChineseRemainder.balanced(n, k)
    assert p.num_partitions == k
    assert_complementary(p, n)


@SETTINGS
@given(n=st.integers(1, 2000), c=st.integers(1, 50), seed=st.integers(0, 2**31))
def test_explicit_permuted_complementary(n, c, seed):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    p = ExplicitPartitions((perm // c, perm % c))
    assert p.sizes(n) == [int((perm // c).max()) + 1, int((perm % c).max()) + 1]
    assert_complementary(p, n)


# --- exact integer arithmetic at large ids ---------------------------------------------------------------------

big_ids = st.lists(st.integers(0, MAX_ID), min_size=1, max_size=20)


def assert_exact(p: Partition, ids: list[int]) -> None:
    got = p.indices(torch.tensor(ids, dtype=torch.int64))
    assert [tuple(col) for col in got.T.tolist()] == [reference_classes(p, i) for i in ids]


@SETTINGS
@given(ids=big_ids, c=st.integers(1, MAX_ID))
def test_quotient_remainder_exact_large(ids, c):
    assert_exact(QuotientRemainder(c), ids)


def test_quotient_remainder_distinguishes_ids_past_float_precision():
    # float32 division (the DLRM reference) maps 2**24 and 2**24 + 1 to one quotient *and* one remainder.
    p = QuotientRemainder(3)
    got = p.indices(torch.tensor([2**24, 2**24 + 1, MAX_ID]))
    assert got.T.tolist() == [
        [(2**24) // 3, (2**24) % 3],
        [(2**24 + 1) // 3, (2**24 + 1) % 3],
        [MAX_ID // 3, MAX_ID % 3],
    ]


@SETTINGS
@given(ids=big_ids, radices=st.lists(st.integers(1, 2**21), min_size=1, max_size=4))
def test_mixed_radix_exact_large(ids, radices):
    assert_exact(MixedRadix(tuple(radices)), ids)


@SETTINGS
@given(ids=big_ids, moduli=st.lists(st.integers(1, MAX_ID), min_size=1, max_size=4))
def test_chinese_remainder_exact_large(ids, moduli):
    assert_exact(ChineseRemainder(tuple(moduli)), ids)  # indices() is defined for any moduli


@SETTINGS
@given(n=st.integers(1, 2**62), k=st.integers(1, 4), frac=st.lists(st.floats(0, 1), min_size=1, max_size=10))
def test_balanced_schemes_in_sizes_at_large_n(n, k, frac):
    ids = sorted({min(n - 1, int(f * (n - 1))) for f in frac} | {0, n - 1})
    for p in (MixedRadix.balanced(n, k), ChineseRemainder.balanced(n, k), QuotientRemainder(max(1, n // 1000))):
        sizes = p.sizes(n)
        assert all(isinstance(s, int) for s in sizes)
        for i in ids:
            classes = reference_classes(p, i)
            assert all(0 <= c < s for c, s in zip(classes, sizes)), (p, i, classes, sizes)
        assert_exact(p, ids)
        p.validate(n)  # complementary: closed-form checks, no enumeration


# --- validate() names a pair that really collides -------------------------------------------------------------


@SETTINGS
@given(g=st.integers(2, 6), a=st.integers(1, 8), b=st.integers(1, 8), data=st.data())
def test_chinese_remainder_non_coprime_reports_collision(g, a, b, data):
    moduli = (g * a, g * b)  # share the factor g
    lcm = math.lcm(*moduli)
    assume(lcm < 5000)
    n = data.draw(st.integers(lcm + 1, lcm + 200))
    p = ChineseRemainder(moduli)
    assert_reported_pair_collides(p, n, lambda i: tuple(i % m for m in moduli))


@SETTINGS
@given(radices=st.lists(st.integers(1, 12), min_size=1, max_size=3), extra=st.integers(1, 100))
def test_mixed_radix_too_small_reports_collision(radices, extra):
    n = math.prod(radices) + extra

    def digits(i):
        out = []
        for r in radices:
            out.append(i % r)
            i //= r
        return tuple(out)

    assert_reported_pair_collides(MixedRadix(tuple(radices)), n, digits)


@SETTINGS
@given(a=st.integers(1, 10), b=st.integers(1, 10), n=st.integers(1, 300))
def test_explicit_quotient_remainder_mismatch(a, b, n):
    # (id // a, id % b) is complementary iff no two ids in one block of a share a residue mod b.
    ids = range(n)
    p = ExplicitPartitions((torch.tensor([i // a for i in ids]), torch.tensor([i % b for i in ids])))
    brute = len({(i // a, i % b) for i in ids}) == n
    if brute:
        p.validate(n)
    else:
        assert_reported_pair_collides(p, n, lambda i: (i // a, i % b))


def test_explicit_mismatched_divisors_examples():
    n = 24
    ids = torch.arange(n)
    # Quotient by 4 but remainder mod 3: ids 0 and 3 share (0, 0).
    assert_reported_pair_collides(ExplicitPartitions((ids // 4, ids % 3)), n, lambda i: (i // 4, i % 3))
    # Quotient by 3, remainder mod 4 is wasteful but still complementary (3 consecutive residues differ).
    ExplicitPartitions((ids // 3, ids % 4)).validate(n)


@SETTINGS
@given(n=st.integers(2, 300), classes=st.lists(st.integers(1, 20), min_size=1, max_size=3), seed=st.integers(0, 2**31))
def test_explicit_random_maps_against_brute_force(n, classes, seed):
    g = torch.Generator().manual_seed(seed)
    maps = tuple(torch.randint(0, c, (n,), generator=g) for c in classes)
    p = ExplicitPartitions(maps)
    lists = [m.tolist() for m in maps]
    if len({tuple(m[i] for m in lists) for i in range(n)}) == n:
        assert_complementary(p, n)
    else:
        assert_reported_pair_collides(p, n, lambda i: tuple(m[i] for m in lists))


# --- balanced_radices / coprime_moduli ------------------------------------------------------------------------


@SETTINGS
@given(n=st.integers(1, 2**62), k=st.integers(1, 5))
def test_balanced_radices(n, k):
    r = balanced_radices(n, k)
    root = n ** (1.0 / k)
    assert len(r) == k and math.prod(r) >= n
    assert max(r) - min(r) <= 1
    assert all(math.floor(root * (1 - 1e-9)) <= x <= math.ceil(root * (1 + 1e-9)) for x in r), (r, root)
    # No slack: lowering a largest radix by one no longer covers n (unless every radix is already 1).
    smaller = sorted(r)
    smaller[-1] -= 1
    assert math.prod(smaller) < n or max(r) == 1


@SETTINGS
@given(n=st.integers(1, 2**62), k=st.integers(1, 5))
def test_coprime_moduli(n, k):
    m = coprime_moduli(n, k)
    root = n ** (1.0 / k)
    assert len(m) == k and math.prod(m) >= n
    assert all(math.gcd(x, y) == 1 for i, x in enumerate(m) for y in m[i + 1 :]), m
    assert min(m) >= min(2, n) and min(m) >= math.floor(root * (1 - 1e-9))
    assert max(m) <= max(2, math.ceil(root * (1 + 1e-9))) + 4 * k, (m, root)


def test_coprime_moduli_examples():
    assert coprime_moduli(10**6, 2) == [1000, 1001]
    assert math.prod(coprime_moduli(10**9, 3)) >= 10**9


# --- misc ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: QuotientRemainder(0),
        lambda: MixedRadix(()),
        lambda: MixedRadix((3, 0)),
        lambda: ChineseRemainder((2, -1)),
    ],
)
def test_bad_parameters_rejected(make):
    with pytest.raises(ValueError):
        make()


def test_num_embeddings_bounds():
    with pytest.raises(ValueError, match=r"\[1, 2\*\*62\]"):
        QuotientRemainder(4).sizes(0)
    with pytest.raises(ValueError, match=r"\[1, 2\*\*62\]"):
        QuotientRemainder(4).validate(2**62 + 1)
    with pytest.raises(TypeError):
        QuotientRemainder(4).sizes(10.0)


def test_explicit_size_mismatch():
    with pytest.raises(ValueError, match="covers 10 ids"):
        ExplicitPartitions((torch.arange(10) % 2, torch.arange(10) // 2)).sizes(11)
