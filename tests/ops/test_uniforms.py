"""The noise stream (DESIGN 4.1): Random123 known answers, and every backend bit-identical."""

from __future__ import annotations

import pytest
import torch

import npn_kernels as npn
from npn_kernels import _ext
from npn_kernels.ops.rng import rng_tensors
from npn_kernels.ops.uniforms import reference
from tests.helpers import backend_params, poisoned

# Random123's kat_vectors for philox4x32-10: counter (4 words), key (2 words) -> 4 words.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]
SEEDS = [0, 1, 2**32 + 7, 2**63 - 1]
OFFSETS = [0, 2**31 - 600, 2**32 - 600, 2**33]  # 2**32 - 600: a 16-counter block straddles the carry into the high word


def _kat_tensors():
    counters = torch.tensor([c for c, _, _ in KAT], dtype=torch.int64)
    keys = torch.tensor([k for _, k, _ in KAT], dtype=torch.int64)
    expected = torch.tensor([o for _, _, o in KAT], dtype=torch.int64)
    return counters, keys, expected


def test_reference_philox_known_answers():
    counters, keys, expected = _kat_tensors()
    out = reference.philox4x32(*counters.unbind(1), keys[:, 0], keys[:, 1])
    assert torch.equal(torch.stack(out, 1), expected)


@pytest.mark.ext
def test_cpp_philox_known_answers():
    counters, keys, expected = _kat_tensors()
    assert torch.equal(_ext.ops.philox4x32(counters, keys), expected)


@pytest.mark.triton
def test_triton_philox_known_answers():
    import triton
    import triton.language as tl

    @triton.jit
    def kat_kernel(c_ptr, k_ptr, out_ptr):
        i = tl.arange(0, 4)
        c = tl.load(c_ptr + i).to(tl.uint32)
        k0 = tl.load(k_ptr).to(tl.uint32)
        k1 = tl.load(k_ptr + 1).to(tl.uint32)
        c0 = tl.sum(tl.where(i == 0, c, 0))
        c1 = tl.sum(tl.where(i == 1, c, 0))
        c2 = tl.sum(tl.where(i == 2, c, 0))
        c3 = tl.sum(tl.where(i == 3, c, 0))
        r0, r1, r2, r3 = tl.philox_impl(c0, c1, c2, c3, k0, k1)
        out = tl.where(i == 0, r0, tl.where(i == 1, r1, tl.where(i == 2, r2, r3)))
        tl.store(out_ptr + i, out.to(tl.int64) & 0xFFFFFFFF)

    counters, keys, expected = _kat_tensors()
    for row in range(len(KAT)):
        out = poisoned((4,), torch.int64)
        kat_kernel[(1,)](counters[row].contiguous(), keys[row].contiguous(), out)
        assert torch.equal(out, expected[row]), row


def test_reference_high_product_does_not_overflow():
    # 0xFFFFFFFF * 0xD2511F53 needs 64 bits: a naive int64 product would wrap negative.
    hi, lo = reference._mulhilo(reference.ROUND_A, torch.tensor([0xFFFFFFFF, 0, 1, 0x80000000]))
    expected = [(0xFFFFFFFF * reference.ROUND_A), 0, reference.ROUND_A, 0x80000000 * reference.ROUND_A]
    assert hi.tolist() == [p >> 32 for p in expected]
    assert lo.tolist() == [p & 0xFFFFFFFF for p in expected]


@pytest.mark.parametrize("backend", backend_params("cpu", "triton"))
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("offset", OFFSETS)
def test_backend_equals_reference_bit_for_bit(backend, seed, offset):
    n = 4097  # not a multiple of 4: the last counter is used partly
    expected = reference.uniforms(n, seed, offset)
    with npn.backends.use(backend):
        got = npn.ops.uniforms(n, seed=seed, offset=offset, device=torch.get_default_device())
    assert got.dtype == torch.float32 and got.shape == (n,)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("backend", backend_params("cpu", "triton"))
@pytest.mark.parametrize("n", [1, 3, 5, 1023, 1026])
def test_launcher_overwrites_every_element(backend, n):
    seed, offset = rng_tensors(2**40 + 3, 17, torch.get_default_device())
    out = poisoned((n,))
    if backend == "cpu":
        _ext.ops.uniforms(seed, offset, out)
    else:
        from npn_kernels.ops.uniforms import triton as uniforms_triton

        uniforms_triton.uniforms(seed, offset, out)
    assert torch.equal(out, reference.uniforms(n, seed, offset))


def test_stream_is_a_prefix_and_offsets_shift_by_counters():
    long = npn.ops.uniforms(40, seed=9, offset=5)
    assert torch.equal(npn.ops.uniforms(13, seed=9, offset=5), long[:13])
    # offset counts Philox counters: +2 skips 8 elements
    assert torch.equal(npn.ops.uniforms(32, seed=9, offset=7), long[8:])


def test_values_in_unit_interval_and_uniform():
    u = npn.ops.uniforms(1 << 16, seed=123, offset=0)
    assert 0.0 <= u.min().item() and u.max().item() < 1.0
    # mean of U(0,1) is 1/2 with standard error sqrt(1/12/n) ~ 0.0011: 5 standard errors
    assert abs(u.mean().item() - 0.5) < 5 * (1 / 12 / u.numel()) ** 0.5
    counts = torch.histc(u, bins=16, min=0, max=1)
    expected = u.numel() / 16
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 50  # chi-square with 15 dof: P(> 50) < 1e-5


def test_seed_and_offset_as_tensors_equal_ints():
    a = npn.ops.uniforms(9, seed=torch.tensor(2**33), offset=torch.tensor([4]))
    assert torch.equal(a, npn.ops.uniforms(9, seed=2**33, offset=4))


def test_empty():
    assert npn.ops.uniforms(0, seed=0, offset=0).shape == (0,)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"seed": -1, "offset": 0}, ValueError, "seed: expected an int in"),
        ({"seed": 2**63, "offset": 0}, ValueError, "seed: expected an int in"),
        ({"seed": 0, "offset": -5}, ValueError, "offset: expected an int in"),
        ({"seed": 1.5, "offset": 0}, TypeError, "seed: expected a Python int"),
        ({"seed": True, "offset": 0}, TypeError, "seed: expected a Python int"),
        ({"seed": torch.tensor(1.0), "offset": 0}, TypeError, "seed: expected a Python int or an int64"),
        ({"seed": 0, "offset": torch.tensor([1, 2])}, TypeError, "offset: expected a Python int or an int64"),
    ],
)
def test_bad_seed_or_offset(kwargs, error, match):
    with pytest.raises(error, match=match):
        npn.ops.uniforms(4, **kwargs)


def test_bad_n():
    with pytest.raises(ValueError, match="n: expected an int >= 0"):
        npn.ops.uniforms(-1, seed=0, offset=0)


def test_opcheck():
    seed, offset = rng_tensors(5, 3, "cpu")
    torch.library.opcheck(torch.ops.npn.uniforms.default, (10, seed, offset))
