"""OWL: the per-layer allocation (hand-computed), the outlier ratio, and prune_model(owl=True)."""

import pytest
import torch

from wanda_kernels._validation import num_pruned

transformers = pytest.importorskip("transformers")

from test_pipeline import calib_ids, tiny_model  # noqa: E402

from wanda_kernels.llm import owl, pipeline  # noqa: E402


def test_allocation_hand_computed():
    # ratios 0.01, 0.03, 0.02 -> scaled onto [0, 2 * 0.08]: 0, 0.16, 0.08; mean 0.08;
    # s_l = 0.5 - (scaled - 0.08): the layer with the most outliers is pruned least.
    got = owl.layer_sparsities([0.01, 0.03, 0.02], 0.5, 0.08)
    assert got == pytest.approx([0.58, 0.42, 0.50], abs=1e-12)


def test_allocation_weighted_mean_is_exact():
    # sizes 3, 1, 1: the weighted mean of the scaled ratios is (0 + 0.16 + 0.08) / 5 = 0.048.
    sizes = [3, 1, 1]
    got = owl.layer_sparsities([0.01, 0.03, 0.02], 0.5, 0.08, sizes)
    assert got == pytest.approx([0.548, 0.388, 0.468], abs=1e-12)
    assert sum(n * s for n, s in zip(sizes, got)) / sum(sizes) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize(("sparsity", "lam"), [(0.5, 0.08), (0.7, 0.08), (0.6, 0.2), (0.3, 0.0)])
def test_allocation_bounds(sparsity, lam):
    ratios = torch.rand(30, generator=torch.Generator().manual_seed(1)).tolist()
    got = owl.layer_sparsities(ratios, sparsity, lam)
    assert sum(got) / len(got) == pytest.approx(sparsity, abs=1e-12)
    assert max(got) - min(got) == pytest.approx(2 * lam, abs=1e-12)
    assert all(sparsity - 2 * lam - 1e-12 <= s <= sparsity + 2 * lam + 1e-12 for s in got)
    assert got[ratios.index(max(ratios))] == min(got)  # most outliers: least pruned


def test_equal_ratios_give_uniform():
    assert owl.layer_sparsities([0.02] * 4, 0.7, 0.08) == [0.7] * 4


def test_outlier_ratio_hand_computed():
    # Scores 1, 1, 1, 1, 16 | 0, 0, 4: mean 24 / 8 = 3; above 5 x 3 = 15: one of eight.
    scores = [torch.tensor([[1.0, 1.0, 1.0, 1.0, 16.0]]), torch.tensor([0.0, 0.0, 4.0])]
    assert owl.outlier_ratio(scores, 5.0) == 1 / 8
    assert owl.outlier_ratio(scores, 1.0) == 2 / 8  # above 3: the 16 and the 4


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(owl_lambda=-0.01), "owl_lambda must be in"),
    (dict(owl_lambda=0.2), "owl_lambda must be in"),  # 0.7 + 2 x 0.2 >= 1
    (dict(owl_lambda=float("nan")), "owl_lambda must be a finite number"),
    (dict(owl_m=0.0), "owl_m .* must be > 0"),
    (dict(owl_m="5"), "owl_m must be a finite number"),
])
def test_bad_owl_options_change_nothing(kwargs, match):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        pipeline.prune_model(model, calib_ids(), 0.7, owl=True, progress=False, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_owl_refuses_nm():
    with pytest.raises(ValueError, match="owl=True gives each decoder layer its own sparsity"):
        pipeline.check_options("wanda", None, "2:4", owl=True)
    with pytest.raises(TypeError, match="owl must be True or False"):
        pipeline.check_options("wanda", 0.5, "unstructured", owl="yes")


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_prune_model_reaches_each_layer_target(method):
    model = tiny_model("llama")
    report = pipeline.prune_model(model, calib_ids(), 0.6, method=method, owl=True, progress=False)
    _, layers = pipeline.find_decoder_layers(model)
    targets = report.layer_targets
    assert len(targets) == len(layers) and max(targets) - min(targets) == pytest.approx(0.16)
    zeros = total = 0
    for layer, target in zip(layers, targets):
        for mod in pipeline.linear_layers(layer).values():
            w = mod.weight
            per_row = (w == 0).sum(dim=1)
            # every row: exactly floor(target * in) zeros (the per-row rule at the layer's own sparsity)
            assert (per_row == num_pruned(w.shape[1], target)).all()
            zeros, total = zeros + int(per_row.sum()), total + w.numel()
    # the model: the target, short of each row's floor (< 1 weight per row)
    assert 0.6 - 1 / 64 < zeros / total <= 0.6
    assert report.options["owl"] and report.owl_seconds > 0


def test_each_pass_brings_a_layer_to_the_working_device_and_back(monkeypatch):
    # device= onloads one decoder layer at a time, in OWL's pass and in the pruning pass,
    # and puts it back where it was. No second device here: the layers "live" on meta (as
    # _first_device is told) and their .to is recorded instead of run.
    model = tiny_model("llama")
    _, layers = pipeline.find_decoder_layers(model)
    moves = {i: [] for i in range(len(layers))}
    for i, layer in enumerate(layers):
        monkeypatch.setattr(layer, "to", lambda dev, i=i, layer=layer: moves[i].append(str(dev)) or layer)
    monkeypatch.setattr(pipeline, "_first_device", lambda module: torch.device("meta"))
    pipeline.prune_model(model, calib_ids(), 0.5, owl=True, device="cpu", progress=False)
    assert all(m == ["cpu", "meta", "cpu", "meta"] for m in moves.values()), moves
