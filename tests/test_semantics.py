"""Hand-computed cases that pin the semantics, run on every implementation."""

import pytest
import torch

import wanda_kernels as wk
from wanda_kernels import reference

# Scores |W| * norms, worked out by hand:
#   row 0: |[1,-2,3,-4,5,-6,7,-8]| * NORMS = [4, 2, 3, 4, 5, 6, 7, 4]
#   row 1: |[1, 1,1, 1,1, 1,1, 1]| * NORMS = [4, 1, 1, 1, 1, 1, 1, 0.5]
W = torch.tensor([[1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0], [1.0] * 8])
NORMS = torch.tensor([4.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5])
T, F = True, False

CASES = {
    # 50% prunes 4 per row, lowest first, ties pruned in column order:
    #   row 0 ascending: 2(c1) 3(c2) 4(c0) 4(c3) | 4(c7) ... -> c7 survives the tie at 4
    #   row 1 ascending: 0.5(c7) 1(c1) 1(c2) 1(c3) | 1(c4) 1(c5) 1(c6) 4(c0)
    "unstructured-50": (
        dict(sparsity=0.5),
        [[F, F, F, F, T, T, T, T], [T, F, F, F, T, T, T, F]],
    ),
    # 25% prunes floor(0.25 * 8) = 2 per row: c1, c2 of row 0; c7 and then the
    # first of the tied 1s (c1) of row 1.
    "unstructured-25": (
        dict(sparsity=0.25),
        [[T, F, F, T, T, T, T, T], [T, F, T, T, T, T, T, F]],
    ),
    # 2:4 keeps the top 2 of [4,2,3,4] -> c0,c3; of [5,6,7,4] -> c5,c6;
    # of [4,1,1,1] -> c0 and the first 1 (c1); of [1,1,1,.5] -> c4,c5.
    "2:4": (
        dict(pattern="2:4"),
        [[T, F, F, T, F, T, T, F], [T, T, F, F, T, T, F, F]],
    ),
    # 4:8 keeps 7,6,5 and the first 4 (c0) of row 0; 4 and the first three 1s of row 1.
    "4:8": (
        dict(pattern="4:8"),
        [[T, F, F, F, T, T, T, F], [T, T, T, T, F, F, F, F]],
    ),
    # Magnitude, per row: row 0 prunes 1,2,3,4 (c0..c3); row 1 (all ties) prunes c0..c3.
    "magnitude-row": (
        dict(sparsity=0.5, metric="magnitude"),
        [[F, F, F, F, T, T, T, T], [F, F, F, F, T, T, T, T]],
    ),
    # Magnitude, per layer: prune 8 of 16. The nine 1s (flat 0 and 8..15) tie; the
    # first eight in row-major order go, so row 1 keeps only its last column.
    "magnitude-layer": (
        dict(sparsity=0.5, metric="magnitude", scope="layer"),
        [[F, T, T, T, T, T, T, T], [F, F, F, F, F, F, F, T]],
    ),
}

BACKENDS = ["reference", "torch", "triton"]


def _mask(backend, weight, norms, kwargs, triton_device=None):
    if backend == "reference":
        return reference.keep_mask(weight, norms, **kwargs)
    if backend == "triton":
        weight, norms = weight.to(triton_device), norms.to(triton_device)
    return wk.prune_mask(weight, norms, backend=backend, **kwargs).cpu()


# Per-layer selection has no Triton kernel: that pair is not generated.
CASE_BACKENDS = [(c, b) for c in CASES for b in BACKENDS if not (b == "triton" and CASES[c][0].get("scope") == "layer")]


@pytest.mark.parametrize(("case", "backend"), CASE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_hand_computed_masks(case, backend, dtype, request):
    kwargs, expected = CASES[case]
    dev = request.getfixturevalue("triton_device") if backend == "triton" else None
    # Every value above is exact in fp16 and bf16, so the cases hold in every dtype.
    got = _mask(backend, W.to(dtype), NORMS, kwargs, dev)
    assert got.tolist() == expected


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_prune_zeroes_exactly_the_pruned_weights(backend, request):
    dev = request.getfixturevalue("triton_device") if backend == "triton" else torch.device("cpu")
    w = W.clone().to(dev)
    keep = wk.prune_(w, NORMS.to(dev), 0.5, backend=backend, return_mask=True)
    expected = torch.tensor(CASES["unstructured-50"][1])
    assert keep.cpu().tolist() == expected.tolist()
    assert torch.equal(w.cpu(), W.masked_fill(~expected, 0))


@pytest.mark.parametrize(
    ("numel", "sparsity", "pruned"),
    [(8, 0.5, 4), (7, 0.5, 3), (100, 0.29, 29), (10, 0.3, 3), (10, 0.7, 7), (4096, 0.5, 2048),
     (11008, 0.6, 6604), (3, 0.0, 0), (5, 0.99, 4)],
)
def test_num_pruned_is_floor_of_the_decimal_product(numel, sparsity, pruned):
    # 0.29 * 100 is 28.999999999999996 in binary floating point; the count is 29.
    assert reference.num_pruned(numel, sparsity) == pruned


def test_norm_scales_columns_not_rows():
    # A large norm on column 0 protects column 0 in every row, whatever the magnitudes.
    w = torch.tensor([[0.1, 1.0, 1.0, 1.0], [0.1, 2.0, 3.0, 4.0]])
    norms = torch.tensor([100.0, 1.0, 1.0, 1.0])
    keep = wk.prune_mask(w, norms, 0.75)
    assert keep[:, 0].all() and keep.sum(1).tolist() == [1, 1]
    assert not wk.prune_mask(w, norms, 0.75, metric="magnitude")[:, 0].any()


def test_zero_sparsity_keeps_everything_and_writes_nothing():
    w = W.clone()
    keep = wk.prune_(w, NORMS, 0.0, return_mask=True)
    assert keep.all() and torch.equal(w, W)
