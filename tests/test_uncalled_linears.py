"""Linear layers a decoder layer never calls are left dense: Mamba's ``dt_proj``.

Mamba's and Falcon-Mamba's mixers (and Jamba's Mamba layers) multiply ``dt_proj.weight`` themselves
(``self.dt_proj.weight @ time_step``) and never call the module, so no input reaches it
(Wanda had nothing to rank it by and failed) and a sparse module in its place breaks the
model (it has no ``weight``). Tiny random models; the oracle is the reference loop, which
leaves a linear it never saw called as it is.
"""

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_layer_calls import real_layer_calls  # noqa: E402
from test_pipeline import TRANSFORMERS_MAJOR, calib_ids, first_layer_inputs  # noqa: E402

import wanda_kernels as wk  # noqa: E402
from wanda_kernels import reference  # noqa: E402
from wanda_kernels.llm import pipeline  # noqa: E402

pytestmark = pytest.mark.skipif(TRANSFORMERS_MAJOR < 5, reason=f"transformers {transformers.__version__}'s Mamba "
                                "mixers call dt_proj as a module, so every linear is called (and pruned)")

MAMBA = dict(vocab_size=128, hidden_size=64, state_size=8, num_hidden_layers=3, expand=2, conv_kernel=4,
             time_step_rank=8)


def tiny(family: str):
    torch.manual_seed(0)
    cfg = (transformers.MambaConfig if family == "mamba" else transformers.FalconMambaConfig)(**MAMBA)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.config.use_cache = False
    return model


def dt_projs(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("dt_proj")}


@pytest.mark.parametrize("family", ["mamba", "falcon_mamba"])
@pytest.mark.parametrize("method", ["wanda", "magnitude", "sparsegpt"])
def test_dt_proj_is_left_dense_and_named_the_rest_pruned(family, method):
    model = tiny(family)
    before = dt_projs(model)
    assert before
    with pytest.warns(RuntimeWarning, match=rf"{len(before)} linear layers \(.*dt_proj.*\) were never called by "
                                            r"their decoder layer's forward .* left dense"):
        report = pipeline.prune_model(model, calib_ids(), pattern="2:4", method=method, progress=False)
    assert sorted(report.uncalled) == sorted(before)
    after = dt_projs(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    names = {f"{i}.{n}" for i, layer in enumerate(report.layers) for n in layer.sparsity}
    assert not any(n.endswith("dt_proj") for n in names) and any(n.endswith("in_proj") for n in names)
    for layer in report.layers:
        assert all(v == pytest.approx(0.5) for v in layer.sparsity.values()), layer.sparsity
    # the share of the decoder layers' weights pruned counts the dense dt_proj out
    _, layers = pipeline.find_decoder_layers(model)
    total = sum(p.numel() for p in layers.parameters() if p.dim() >= 2)
    pruned = sum(w.numel() for layer in layers for n, w in pipeline.prunable_weights(layer).items()
                 if not n.endswith("dt_proj"))
    assert report.pruned_weight_fraction == pytest.approx(pruned / total)


@pytest.mark.parametrize("family", ["mamba", "falcon_mamba"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_equals_the_reference_loop(family, pattern):
    model = tiny(family)
    twin = copy.deepcopy(model)
    calib = calib_ids(n=4)
    _, layers = pipeline.find_decoder_layers(twin)
    inputs, _ = first_layer_inputs(twin, calib, layers[0])
    reference.sequential_prune(layers, inputs, real_layer_calls(twin, layers, calib[0]), pattern=pattern)
    with pytest.warns(RuntimeWarning, match="never called"):
        pipeline.prune_model(model, calib, pattern=pattern, progress=False)
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_the_sparse_model_runs_and_keeps_dt_proj_a_linear(method):
    # (before: magnitude pruned dt_proj 2:4, sparsify_ replaced it, and the model failed
    # with "'SparseLinear' object has no attribute 'weight'")
    model = tiny("mamba")
    with pytest.warns(RuntimeWarning, match="never called"):
        pipeline.prune_model(model, calib_ids(), pattern="2:4", method=method, progress=False)
    model = model.to(torch.bfloat16)  # the sparse modules hold fp16 or bf16
    ids = calib_ids(n=1, seed=5)
    with torch.no_grad():
        dense = model(ids).logits
    replaced = wk.sparsify_(model)
    assert replaced and not any(n.endswith("dt_proj") for n in replaced)
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith("dt_proj"))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # no kernel on the CPU: dense F.linear, said once per process
        sparse = model(ids).logits
    assert torch.equal(sparse, dense)  # the decompressed weight is the pruned one: the same F.linear


def test_owl_and_dsnot_leave_dt_proj_dense_too():
    for options in (dict(owl=True, sparsity=0.5), dict(dsnot=True, sparsity=0.5)):
        model = tiny("mamba")
        before = dt_projs(model)
        with pytest.warns(RuntimeWarning, match="never called"):
            report = pipeline.prune_model(model, calib_ids(), progress=False, **options)
        assert sorted(report.uncalled) == sorted(before)
        assert all(torch.equal(before[n], w) for n, w in dt_projs(model).items())
        assert 0.4 < report.overall_sparsity() < 0.6
