"""prune_model on tiny random decoders of seven families (two mixtures of experts) and on a truncated SmolLM2."""

import copy
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import wanda_kernels as wk  # noqa: E402
from wanda_kernels import reference  # noqa: E402
from wanda_kernels.llm import pipeline  # noqa: E402

# 4.57, the oldest transformers we support, keeps some models in other layouts (the
# .ci/run section of the oldest versions runs these tests with it).
TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


def skip_before_transformers_5(why: str) -> None:
    """Skip the calling test on transformers 4.x, which ``why``."""
    if TRANSFORMERS_MAJOR < 5:
        pytest.skip(f"transformers {transformers.__version__} {why}")


TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=64)


def tiny_model(family: str):
    torch.manual_seed(0)
    if family == "llama":
        cfg = transformers.LlamaConfig(num_key_value_heads=2, **TINY)
    elif family == "mistral":
        cfg = transformers.MistralConfig(num_key_value_heads=2, **TINY)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(num_key_value_heads=2, **TINY)
    elif family == "opt":
        cfg = transformers.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=3,
                                     num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64)
    elif family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=3, n_head=4, n_positions=64)
    elif family == "mixtral":  # fused experts: 3-D gate_up_proj / down_proj, no nn.Linear
        cfg = transformers.MixtralConfig(num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, **TINY)
    elif family == "llama4":  # stacked experts (experts, in, out), router-scaled inputs; a shared expert of linears
        cfg = transformers.Llama4TextConfig(num_key_value_heads=2, head_dim=16, intermediate_size_mlp=96,
                                            num_local_experts=4, interleave_moe_layer_step=1, **TINY)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.config.use_cache = False
    return model


def calib_ids(n=4, seqlen=16, seed=0):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def pruned_weights(model):
    """``{"<layer>.<linear>": (out, in) view}`` of every weight prune_model prunes (fused experts' too)."""
    _, layers = pipeline.find_decoder_layers(model)
    return {f"{i}.{n}": w for i, layer in enumerate(layers) for n, w in pipeline.prunable_weights(layer).items()}


def first_layer_inputs(model, calib, layer=None):
    """The first decoder layer's (``layer``'s; default ``model.model.layers[0]``) inputs
    (one row per sample) and keyword arguments, from a plain hook of the test's own (the
    reference loop's starting point)."""
    captured = {}

    def grab(module, args, kwargs):
        captured.setdefault("x", []).append(args[0])
        captured.setdefault("kw", kwargs)
        raise StopIteration

    handle = (model.model.layers[0] if layer is None else layer).register_forward_pre_hook(grab, with_kwargs=True)
    for row in calib:
        with pytest.raises(StopIteration), torch.no_grad():
            model(row[None], use_cache=False)
    handle.remove()
    return torch.cat(captured["x"]), {k: v for k, v in captured["kw"].items() if k != "past_key_values"}


def _outside_decoder(model):
    _, layers = pipeline.find_decoder_layers(model)
    inside = {id(p) for p in layers.parameters()}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in inside}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "opt", "gpt2", "mixtral", "llama4"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_exact_sparsity_and_untouched_rest(family, pattern):
    model = tiny_model(family)
    before = _outside_decoder(model)
    report = pipeline.prune_model(model, calib_ids(), 0.5 if pattern == "unstructured" else None, pattern=pattern,
                                  progress=False)
    weights = pruned_weights(model)
    assert len(report.layers) == 3 and len(weights) >= 3 * 4
    for name, w in weights.items():
        if pattern == "unstructured":
            assert (w == 0).sum(1).eq(reference.num_pruned(w.shape[1], 0.5)).all(), name
        else:
            assert (w.reshape(w.shape[0], -1, 4) != 0).sum(-1).le(2).all(), name
            assert (w == 0).float().mean() >= 0.5
    after = _outside_decoder(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert report.overall_sparsity() == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize(("pattern", "metric"), [("unstructured", "wanda"), ("2:4", "wanda"), ("4:8", "wanda"),
                                                 ("unstructured", "magnitude")])
def test_equals_the_reference_loop(pattern, metric):
    model = tiny_model("llama")
    twin = copy.deepcopy(model)
    calib = calib_ids(n=6)
    x, kw = first_layer_inputs(twin, calib)
    assert torch.equal(x, twin.model.embed_tokens(calib))
    reference.sequential_prune(twin.model.layers, x, kw, pattern=pattern, metric=metric)

    method = "magnitude" if metric == "magnitude" else "wanda"
    pipeline.prune_model(model, calib, pattern=pattern, method=method, scope="row" if method == "magnitude" else None,
                         progress=False)
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(a, b), name


def test_magnitude_per_layer_is_the_default_baseline():
    model = tiny_model("llama")
    other = copy.deepcopy(model)
    seen = []
    handle = model.model.embed_tokens.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape))
    pipeline.prune_model(model, calib_ids(), 0.5, method="magnitude", progress=False)
    handle.remove()
    for name, w in pruned_weights(model).items():
        assert int((w == 0).sum()) == reference.num_pruned(w.numel(), 0.5), name
    # magnitude needs no calibration data: the masks do not depend on it, and the only
    # forwards are two of the first row's first 16 tokens (which linears the layers call)
    pipeline.prune_model(other, calib_ids(seed=3, seqlen=32), 0.5, method="magnitude", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    assert seen == [(1, 16), (1, 16)]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_exact_sparsity_and_lower_error_than_magnitude(pattern):
    model = tiny_model("llama")
    calib = calib_ids(n=8, seqlen=32)
    ids = calib_ids(n=4, seqlen=32, seed=1)
    with torch.no_grad():
        dense = model(ids).logits
    errors = {}
    for method in ("sparsegpt", "magnitude"):
        m = copy.deepcopy(model)
        pipeline.prune_model(m, calib, pattern=pattern, method=method, scope="row" if method == "magnitude" else None,
                             progress=False)
        for name, w in pruned_weights(m).items():
            if pattern == "unstructured":
                assert (w == 0).sum(1).eq(reference.num_pruned(w.shape[1], 0.5)).all(), name
            else:
                assert (w.reshape(w.shape[0], -1, 4) != 0).sum(-1).le(2).all(), name
        with torch.no_grad():
            errors[method] = float((m(ids).logits - dense).norm())
    assert errors["sparsegpt"] < errors["magnitude"]


def test_bad_arguments():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"method must be one of .*'obs'"):
        pipeline.prune_model(model, calib_ids(), method="obs")
    with pytest.raises(ValueError, match=r"calib must be an int64 tensor"):
        pipeline.prune_model(model, calib_ids().float())
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\); got 1\.2"):
        pipeline.prune_model(model, calib_ids(), 1.2)
    with pytest.raises(ValueError, match=r"no nn\.ModuleList of decoder layers"):
        pipeline.prune_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), calib_ids())


class _Block(torch.nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.proj = torch.nn.Linear(d_in, d_out)

    def forward(self, h, **kwargs):
        return (self.proj(h),)


class _Chain(torch.nn.Module):
    """An embedding, then decoder "layers" of one linear each, of the given widths."""

    def __init__(self, widths=(8, 8, 8, 8)):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(128, widths[0])
        self.layers = torch.nn.ModuleList([_Block(a, b) for a, b in zip(widths[:-1], widths[1:])])

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        for block in self.layers:
            h = block(h)[0]
        return h


def test_every_linear_is_checked_before_the_first_weight_changes():
    model = _Chain((8, 8, 6, 6))  # the last layer's in_features (6) cannot hold a 2:4 pattern
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"pattern '2:4' needs in_features divisible by 4; layers\.2\.proj\.weight"):
        pipeline.prune_model(model, calib_ids(), pattern="2:4", progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", ["wanda", "magnitude", "sparsegpt"])
def test_non_finite_weights_are_refused_before_any_weight_changes(method):
    model = tiny_model("llama")
    _, layers = pipeline.find_decoder_layers(model)
    with torch.no_grad():
        layers[1].mlp.up_proj.weight[3, 4] = float("nan")
        layers[2].self_attn.o_proj.weight[0, 0] = float("-inf")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"2 weights of the model hold NaN or Inf values \(model\.layers\.1\.mlp\."
                                         r"up_proj\.weight, model\.layers\.2\.self_attn\.o_proj\.weight\).* Nothing "
                                         r"was pruned"):
        pipeline.prune_model(model, calib_ids(), 0.5, method=method, progress=False)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, equal_nan=True)


def test_non_finite_calibration_norms_are_reported_once_at_the_end():
    model = _Chain()
    with torch.no_grad():
        model.embed.weight[:] = float("inf")  # every activation overflows
    with pytest.warns(RuntimeWarning, match=r"decoder layers \[0, 1, 2\] saw non-finite activations"):
        report = pipeline.prune_model(model, calib_ids(), 0.5, progress=False)
    assert len(report.layers) == 3 and all(layer.sparsity for layer in report.layers)


def test_each_method_is_one_table_entry():
    assert set(pipeline.METHODS) == {"wanda", "magnitude", "sparsegpt"}
    assert pipeline.METHODS["magnitude"].collect is None and pipeline.METHODS["magnitude"].metric == "magnitude"


# ---------------------------------------------------------------------------
# The real model, truncated to its first layers.

def _assets_or_skip():
    from wanda_kernels.llm import data, models

    try:
        path = models.default_model_dir()
        data.austen_dir()
    except (FileNotFoundError, ImportError) as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must install the model and corpus (tools/install_assets.sh): {exc}")
        pytest.skip(str(exc))
    return path


@pytest.fixture(scope="module")
def smol():
    from wanda_kernels.llm import data, models

    _assets_or_skip()
    model, tok = models.load_model()
    keep = 4
    model.model.layers = model.model.layers[:keep]
    model.config.num_hidden_layers = keep
    calib = data.sample_windows(tok, data.load_corpus(split="calib"), 16, 128, seed=0)
    evalw = data.eval_windows(tok, data.load_corpus(split="eval"), 128, max_tokens=128 * 16)
    return model, tok, calib, evalw


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_truncated_smollm2_wanda_beats_magnitude(smol, pattern):
    from wanda_kernels.llm import evaluate

    model, _, calib, evalw = smol
    ppl = {}
    for method in ("wanda", "magnitude"):
        m = copy.deepcopy(model)
        pipeline.prune_model(m, calib, pattern=pattern, method=method, progress=False)
        ppl[method] = evaluate.perplexity(m, evalw, progress=False)
    assert ppl["wanda"] < ppl["magnitude"], ppl


def test_truncated_smollm2_equals_reference_loop(smol):
    model, _, calib, _ = smol
    model = copy.deepcopy(model)
    twin = copy.deepcopy(model)
    calib = calib[:4, :64]
    inputs, calls = pipeline.capture_layer_inputs(twin, twin.model.layers, calib)
    assert torch.equal(inputs, twin.model.embed_tokens(calib))
    reference.sequential_prune(twin.model.layers, inputs, [(c.args, c.kwargs) for c in calls], pattern="2:4")
    pipeline.prune_model(model, calib, pattern="2:4", progress=False)
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(a, b), name
    assert wk.sparsify_(copy.deepcopy(model).half())  # the pruned layers are valid 2:4 layers


def test_nm_pattern_with_default_sparsity():
    model = tiny_model("llama")
    report = pipeline.prune_model(model, calib_ids(), pattern="1:4", progress=False)
    assert report.sparsity == 0.75
    for name, w in pruned_weights(model).items():
        assert (w.reshape(w.shape[0], -1, 4) != 0).sum(-1).le(1).all(), name
