"""N:M channel permutation: the search, folding (exact), SparseLinear's gather, checkpoints, refusals."""

import copy
import itertools

import pytest
import torch

import wanda_kernels as wk

transformers = pytest.importorskip("transformers")
pytest.importorskip("scipy")

from test_pipeline import calib_ids, tiny_model  # noqa: E402

from wanda_kernels import reference  # noqa: E402
from wanda_kernels.llm import checkpoint, pipeline  # noqa: E402
from wanda_kernels.llm.permute import (  # noqa: E402
    _assignment_step,
    _group,
    _ranked,
    _sorting_network,
    fold_,
    kept_score,
    nm_permutation,
)


def test_hand_computed_reallocation():
    # Columns 0-3 score 10, columns 4-7 score 1. In order, 2:4 keeps 10+10 and 1+1 = 22 per
    # row; mixing two strong and two weak channels per group keeps 10+10 twice = 40.
    scores = torch.tensor([[10.0] * 4 + [1.0] * 4] * 3)
    assert kept_score(scores, 2, 4) == 3 * 22
    perm = nm_permutation(scores, 2, 4)
    assert kept_score(scores, 2, 4, perm) == 3 * 40
    assert sorted(perm.tolist()) == list(range(8))
    strong = [(int(c) < 4) for c in perm]
    assert strong[:4].count(True) == 2 and strong[4:].count(True) == 2


def test_nothing_to_gain_is_identity():
    scores = torch.ones(4, 16)
    assert torch.equal(nm_permutation(scores, 2, 4), torch.arange(16))


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4)])
def test_never_worse_than_in_order(n, m):
    g = torch.Generator().manual_seed(n * m)
    scores = torch.rand(32, 64, generator=g) ** 4 * torch.rand(64, generator=g)
    perm = nm_permutation(scores, n, m)
    assert torch.equal(perm.sort().values, torch.arange(64))
    assert kept_score(scores, n, m, perm) > kept_score(scores, n, m)


def test_assignment_step_is_optimal_for_its_slot():
    # Three groups: the step's reassignment of one slot beats (or ties) all 3! others.
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(5, 12, generator=g) ** 3
    start = torch.randperm(12, generator=g)
    for slot in range(4):
        step = _assignment_step(_group(scores, start, 2, 4), 2, slot)
        got = kept_score(scores, 2, 4, start if step is None else step.perm)
        channels = start[slot::4].clone()
        best = 0.0
        for order in itertools.permutations(range(3)):
            trial = start.clone()
            trial[slot::4] = channels[list(order)]
            best = max(best, kept_score(scores, 2, 4, trial))
        assert got == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("m", range(2, 33))
def test_sorting_network_sorts_every_input(m):
    # The 0/1 principle: a comparator network that sorts every 0/1 input sorts every input.
    # Exhaustive up to M = 16; above, random inputs against torch.sort.
    if m <= 16:
        x = ((torch.arange(1 << m)[None, :] >> torch.arange(m)[:, None]) & 1).float()
    else:
        x = torch.rand(m, 4096, generator=torch.Generator().manual_seed(m))
    got = torch.stack(_ranked(list(x.unbind(0))))
    assert torch.equal(got, x.sort(dim=0, descending=True).values)
    assert all(0 <= a < b < m for a, b in _sorting_network(m))


def test_group_statistics_are_the_sorted_groups():
    g = torch.Generator().manual_seed(5)
    scores = torch.rand(6, 24, generator=g)
    perm = torch.randperm(24, generator=g)
    grouping = _group(scores, perm, 3, 8)
    groups = scores[:, perm].reshape(6, 3, 8)
    assert torch.equal(torch.stack(grouping.planes, dim=-1), groups)
    assert torch.equal(torch.stack(grouping.ranked, dim=-1), groups.sort(dim=-1, descending=True).values)
    assert grouping.kept == pytest.approx(reference.nm_kept_score(scores, 3, 8, perm), rel=1e-14)


@pytest.mark.parametrize(("n", "m", "cols"), [(2, 4, 64), (4, 8, 64), (1, 4, 48), (3, 8, 96), (2, 6, 60), (5, 16, 64)])
@pytest.mark.parametrize("rounds", [1, 2])
def test_search_equals_the_written_out_twin(n, m, cols, rounds):
    # Tie-free scores (continuous, heavy-tailed like Wanda's): the product's search (sorting
    # network, the N-th largest of the others from the group's order, one plane moved per
    # step) takes the same steps as the twin's (sorts, full fp64 gain tensors).
    g = torch.Generator().manual_seed(n * 100 + m * 10 + rounds)
    scores = torch.rand(24, cols, generator=g) ** 4 * torch.rand(cols, generator=g)
    got = nm_permutation(scores, n, m, rounds=rounds)
    want = reference.nm_permutation(scores, n, m, rounds=rounds)
    assert torch.equal(got, want)
    assert kept_score(scores, n, m, got) == pytest.approx(reference.nm_kept_score(scores, n, m, want), rel=1e-14)


def _layer_out(layer, x, kwargs):
    return pipeline._layer_out(layer(x, **kwargs))


def test_fold_is_exact_fp32():
    model = tiny_model("llama")
    calib = calib_ids()
    ref = model(calib).logits
    _, layers = pipeline.find_decoder_layers(model)
    g = torch.Generator().manual_seed(0)
    for layer in layers:
        fold_(layer.mlp.down_proj, [layer.mlp.gate_proj, layer.mlp.up_proj], torch.randperm(128, generator=g))
        # head_dim 16: one permutation of the head dimension, every head (4 query, 2 key/value heads)
        fold_(layer.self_attn.o_proj, [layer.self_attn.v_proj], torch.randperm(16, generator=g), head_dim=16)
    # Only the order of the sums changes: fp32 rounding, far below the logits' scale.
    torch.testing.assert_close(model(calib).logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:SparseLinear runs dense")
def test_folded_equals_applied_bit_for_bit():
    # down_proj pruned 2:4 in a permuted input order, two ways: folded into gate/up (the
    # intermediate activations arrive permuted) or applied by SparseLinear's gather.
    torch.manual_seed(0)
    gate, up, down = (torch.nn.Linear(64, 128, bias=False), torch.nn.Linear(64, 128, bias=False),
                      torch.nn.Linear(128, 64, bias=False))
    for mod in (gate, up, down):
        mod.half()
    x = torch.randn(5, 64).half()
    norms = torch.rand(128) + 0.5
    scores = down.weight.float().abs() * norms
    perm = nm_permutation(scores, 2, 4)
    assert not torch.equal(perm, torch.arange(128))

    def mlp(gate, up, down_fn):
        return down_fn(torch.nn.functional.silu(gate(x)) * up(x))

    folded = [copy.deepcopy(m) for m in (gate, up, down)]
    fold_(folded[2], folded[:2], perm)
    wk.prune_(folded[2], norms[perm], pattern="2:4")
    y_folded = mlp(folded[0], folded[1], folded[2])

    applied = copy.deepcopy(down)
    w = applied.weight.data[:, perm]
    wk.prune_(w, norms[perm], pattern="2:4")
    applied.weight.data[:, perm] = w
    sparse = wk.SparseLinear.from_linear(applied, perm=perm)
    y_applied = mlp(gate, up, sparse)  # on a CPU: the dense fallback on the decompressed weight
    assert torch.equal(y_folded, y_applied)
    assert torch.equal(sparse.to_dense(), applied.weight.data)  # to_dense gives the inputs' own order
    assert not wk.sparse24.is_24_sparse(applied.weight.data)  # 2:4 only in the permuted order


@pytest.mark.filterwarnings("ignore:.*SparseLinear.* run.* dense")
def test_prune_model_permute_then_sparsify_and_checkpoint(tmp_path):
    model = tiny_model("llama")
    calib = calib_ids()
    plain = copy.deepcopy(model)
    report = pipeline.prune_model(model, calib, pattern="2:4", permute=True, progress=False)
    pipeline.prune_model(plain, calib, pattern="2:4", progress=False)
    # down_proj and o_proj folded, the rest permuted at run time; q/k/v share one, gate/up one
    assert sorted(report.folded) == sorted(f"model.layers.{i}.{n}" for i in range(3)
                                           for n in ("mlp.down_proj", "self_attn.o_proj"))
    perms = report.permutations
    assert set(perms) <= {f"model.layers.{i}.{n}" for i in range(3) for n in
                          ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")}
    assert len(perms) >= 6
    assert torch.equal(perms["model.layers.0.self_attn.q_proj"], perms["model.layers.0.self_attn.k_proj"])
    assert report.to_dict()["permutations"] == sorted(perms)
    # Without the permutations the unfolded layers are not 2:4 in their own order.
    half = copy.deepcopy(model).half()
    assert len(wk.sparsify_(copy.deepcopy(half))) < 21
    names = wk.sparsify_(half, permutations=perms)
    assert len(names) == 21
    assert sum(m.perm is not None for m in half.modules() if isinstance(m, wk.SparseLinear)) == len(perms)
    with torch.no_grad():
        got = half(calib).logits.float()
    torch.testing.assert_close(got, model.half()(calib).logits.float(), rtol=2e-2, atol=2e-2)

    out = checkpoint.save_compressed(model, None, tmp_path / "c", report=report, progress=False)
    loaded, _ = checkpoint.load_compressed(out)
    with torch.no_grad():
        again = loaded(calib).logits.float()
    # (the half()-converted model also rounds its RoPE tables to fp16; the loaded one keeps fp32)
    torch.testing.assert_close(again, got, rtol=2e-2, atol=2e-2)
    sparse_loaded = dict(loaded.named_modules())
    for name, mod in half.named_modules():
        if isinstance(mod, wk.SparseLinear):  # stored and loaded bit for bit, permutations included
            other = sparse_loaded[name]
            assert torch.equal(other.values, mod.values) and torch.equal(other.meta, mod.meta)
            assert (other.perm is None) == (mod.perm is None)
            assert mod.perm is None or torch.equal(other.perm, mod.perm)
    dense_out = checkpoint.save_pruned(model, None, tmp_path / "d", report=report)
    stored = checkpoint.load_permutations(dense_out)
    assert set(stored) == set(perms) and all(torch.equal(stored[k], perms[k]) for k in perms)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(pattern="unstructured", sparsity=0.5), ValueError, "permute=True reorders input channels"),
    (dict(pattern="2:4", method="magnitude"), ValueError, "permute=True needs calibration statistics"),
    (dict(pattern="2:4", permute_value=1), TypeError, "permute must be True or False"),
])
def test_bad_permute_options(kwargs, error, match):
    kwargs = dict(kwargs)
    permute = kwargs.pop("permute_value", True)
    method = kwargs.pop("method", "wanda")
    with pytest.raises(error, match=match):
        pipeline.check_options(method, kwargs.pop("sparsity", None), kwargs.pop("pattern"), permute=permute)


@pytest.mark.parametrize(("perm", "error", "match"), [
    (torch.tensor([0, 1, 2, 2, 4, 5, 6, 7]), ValueError, "must be a permutation of range"),
    (torch.arange(4), ValueError, "must be a permutation of range"),
    (torch.arange(8).float(), TypeError, "perm must be a 1-D int64 tensor"),
])
def test_sparse_linear_refuses_bad_perm(perm, error, match):
    w = torch.zeros(32, 8, dtype=torch.float16)
    with pytest.raises(error, match=match):
        wk.SparseLinear.from_dense(w, perm=perm)


def test_sparsify_refuses_unknown_permutation_names():
    model = torch.nn.Sequential(torch.nn.Linear(8, 32).half())
    with pytest.raises(ValueError, match="permutations name layers that are not in the model: nope"):
        wk.sparsify_(model, permutations={"nope": torch.arange(8)})


def test_load_refuses_a_damaged_perm_and_changes_nothing():
    w = torch.zeros(32, 8, dtype=torch.float16)
    w[:, 0] = 1.0
    module = wk.SparseLinear.from_dense(w, perm=torch.tensor([7, 6, 5, 4, 3, 2, 1, 0]))
    state = {k: v.clone() for k, v in module.state_dict().items()}
    before = {k: v.clone() for k, v in module.state_dict().items()}
    state["perm"][0] = 6  # 6 twice, 7 never
    with pytest.raises(ValueError, match="perm must be a permutation of range\\(8\\)"):
        module.load_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_sparsify_refuses_a_bad_permutation_before_replacing_anything():
    model = torch.nn.Sequential(torch.nn.Linear(8, 32).half(), torch.nn.Linear(8, 32).half())
    for lin in model:
        lin.weight.data[:, 1::2] = 0  # 2:4 in order
    with pytest.raises(ValueError, match=r"permutations\['1'\] must be a permutation of range\(8\)"):
        wk.sparsify_(model, permutations={"1": torch.zeros(8, dtype=torch.int64)})
    assert all(type(m) is torch.nn.Linear for m in model)
    with pytest.raises(TypeError, match="permutations must be a dict"):
        wk.sparsify_(model, permutations=[("1", torch.arange(8))])


def test_sparsify_refuses_a_named_layer_not_24_in_that_order_and_changes_nothing():
    # A layer the permutations name is one the caller expects on sparse tensor cores: one
    # that is not 2:4 in that order (permutations of another run) is an error, not a layer
    # silently left dense.
    model = torch.nn.Sequential(torch.nn.Linear(8, 32).half(), torch.nn.Linear(8, 32).half())
    for lin in model:
        lin.weight.data[:, 1::2] = 0  # 2:4 in order: columns 0, 2 | 4, 6 kept
    swap = torch.tensor([1, 0, 2, 3, 4, 5, 6, 7])  # still 2:4 (the groups keep their columns)
    reverse = torch.arange(7, -1, -1)  # the same groups, reversed: still 2:4
    spread = torch.tensor([0, 2, 4, 1, 6, 3, 5, 7])  # kept 0, 2, 4 in the first group: not 2:4
    with pytest.raises(ValueError, match=r"^1: its weight is not 2:4 sparse with its inputs in the order of "
                                         r"permutations\['1'\]; pass the permutations of the prune_model run"):
        wk.sparsify_(model, permutations={"0": swap, "1": spread})
    assert all(type(m) is torch.nn.Linear for m in model)
    # Left out by filter_fn: not checked, not replaced.
    assert wk.sparsify_(model, lambda m, name: name == "0", permutations={"0": swap, "1": spread}) == ["0"]
    assert torch.equal(model[0].perm, swap) and type(model[1]) is torch.nn.Linear
    # A layer replaced by an earlier call is left as it is.
    assert wk.sparsify_(model, permutations={"0": swap, "1": reverse}) == ["1"]
    assert torch.equal(model[0].perm, swap) and torch.equal(model[1].perm, reverse)


def test_sparsify_refuses_permutations_of_a_module_that_is_not_a_linear_layer():
    model = torch.nn.Sequential(torch.nn.Linear(8, 32).half(), torch.nn.ReLU())
    with pytest.raises(ValueError, match=r"permutations\['1'\] names a ReLU, not a linear layer"):
        wk.sparsify_(model, permutations={"1": torch.arange(8)})
    assert type(model[0]) is torch.nn.Linear


def test_permute_without_scipy_says_how_to_install_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else real(name, *a))
    with pytest.raises(ImportError, match=r"permute=True needs scipy .*pip install scipy"):
        pipeline.check_options("wanda", None, "2:4", permute=True)
