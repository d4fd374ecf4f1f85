"""prune_model on mixture-of-experts models whose experts transformers stores fused in 3-D weights.

Mixtral-style (``(experts, out, in)``, gate rows then up rows), gpt-oss-style
(``(experts, in, out)``, gate and up interleaved, biases, its own gate function) and
Llama 4's stacked (one router-scaled input per expert block, ``(experts, in, out)``)
layouts, against the plain-torch reference loop and against norms computed by hand.
"""

import copy
import re
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_pipeline import (  # noqa: E402
    TRANSFORMERS_MAJOR,
    calib_ids,
    first_layer_inputs,
    pruned_weights,
    skip_before_transformers_5,
    tiny_model,
)

from wanda_kernels import reference  # noqa: E402
from wanda_kernels.llm import pipeline  # noqa: E402
from wanda_kernels.llm.experts import expert_linears, is_fused_experts  # noqa: E402


def _mixtral(experts=8, top_k=2, layers=3):
    skip_before_transformers_5("keeps Mixtral's experts as modules of their own (nn.Linear each), not 3-D weights")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     num_local_experts=experts, num_experts_per_tok=top_k)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.config.use_cache = False
    return model


def test_expert_views_write_through_and_are_gone_afterwards():
    model = _mixtral()
    layer = model.model.layers[0]
    experts = layer.mlp.experts
    assert is_fused_experts(experts) and not is_fused_experts(layer.mlp.gate) and not is_fused_experts(layer)
    keys = set(model.state_dict())
    with expert_linears(layer) as found:
        assert found.names == [f"mlp.experts.{e}.{p}" for e in range(8) for p in ("gate_up_proj", "down_proj")]
        linears = pipeline.linear_layers(layer)
        assert set(found.names) <= set(linears) and len(linears) == 4 + 16
        view = linears["mlp.experts.3.down_proj"].weight
        assert view.shape == (64, 128) and view.data_ptr() == experts.down_proj[3].data_ptr()
        view.data[0, 0] = 7.0
    assert experts.down_proj[3, 0, 0] == 7.0  # the model's weight changed
    assert set(model.state_dict()) == keys and not hasattr(experts, "3")
    assert len(pipeline.linear_layers(layer)) == 4


def test_replay_runs_each_expert_on_its_own_tokens_once_per_call():
    experts = _mixtral().model.layers[0].mlp.experts
    hidden, weights = torch.randn(5, 64), torch.rand(5, 2)
    index = torch.tensor([[0, 1], [1, 2], [0, 3], [7, 1], [2, 0]])  # expert 4, 5, 6: no token
    seen: dict[int, list] = {}
    with expert_linears(experts) as found:  # the module itself as the block: names "3.down_proj"
        assert found.names[:2] == ["0.gate_up_proj", "0.down_proj"]
        for e in range(8):
            getattr(experts, str(e)).gate_up_proj.register_forward_pre_hook(
                lambda module, args, e=e: seen.setdefault(e, []).append(args[0]))
        with torch.no_grad():
            experts(hidden, index, weights)  # replay off: nothing seen
            assert not seen
            with found.replay():
                experts(hidden, index, weights)
                experts(hidden_states=hidden, top_k_index=index, top_k_weights=weights)
    for e in range(8):
        assert len(seen[e]) == 2 and all(torch.equal(x, hidden[(index == e).any(-1)]) for x in seen[e]), e


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_mixtral_equals_the_reference_loop(pattern):
    model = _mixtral()
    twin = copy.deepcopy(model)
    calib = calib_ids(n=6)
    x, kw = first_layer_inputs(twin, calib)
    reference.sequential_prune(twin.model.layers, x, kw, pattern=pattern)
    report = pipeline.prune_model(model, calib, pattern=pattern, progress=False)
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(a, b), name
    assert report.expert_linears == 3 * 8 * 2 and report.pruned_weight_fraction > 0.99
    expert_sparsity = [v for layer in report.layers for k, v in layer.sparsity.items() if ".experts." in k]
    assert len(expert_sparsity) == 48 and min(expert_sparsity) >= 0.5
    # The experts are most of the weights, and they were pruned.
    experts = model.model.layers[1].mlp.experts
    assert (experts.gate_up_proj == 0).float().mean() >= 0.5 and (experts.down_proj == 0).float().mean() >= 0.5


def test_experts_no_calibration_token_reached_are_pruned_by_magnitude_and_named():
    model = _mixtral(experts=16, top_k=1, layers=2)
    twin = copy.deepcopy(model)
    calib = calib_ids(n=1, seqlen=4)  # 4 tokens: at most 4 of 16 experts per layer
    x, kw = first_layer_inputs(twin, calib)
    reference.sequential_prune(twin.model.layers, x, kw)
    with pytest.warns(RuntimeWarning, match=r"expert projections \(model\.layers\.0\.mlp\.experts\.\d+\.gate_up_proj, "
                                            r".*got no calibration token.*pruned by weight magnitude"):
        report = pipeline.prune_model(model, calib, progress=False)
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(a, b), name
    unreached = {int(re.search(r"layers\.0\.mlp\.experts\.(\d+)\.gate_up_proj", n).group(1))
                 for n in report.uncalibrated if re.search(r"layers\.0\.mlp\.experts\.(\d+)\.gate_up_proj", n)}
    assert 12 <= len(unreached) < 16 and len(report.uncalibrated) >= 2 * 2 * 12
    experts = model.model.layers[0].mlp.experts
    dense_experts = _mixtral(experts=16, top_k=1, layers=2).model.layers[0].mlp.experts  # the same seed
    for e in sorted(unreached)[:3]:
        dense = dense_experts.gate_up_proj.data[e]
        keep = reference.keep_mask(dense, None, 0.5, metric="magnitude")
        assert torch.equal(experts.gate_up_proj.data[e], dense * keep), e


@pytest.mark.parametrize(("method", "options"), [("sparsegpt", {}), ("wanda", {"dsnot": True})])
def test_methods_with_x_t_x_prune_experts_no_token_reached_by_magnitude(method, options):
    # Their X^T X is zero: DSnoT would start from all-tied scores (and SparseGPT needs an
    # invertible H); the identity in its place ranks by |W|, with no weight update.
    model = _mixtral(experts=16, top_k=1, layers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report = pipeline.prune_model(model, calib_ids(n=1, seqlen=4), method=method, progress=False, **options)
    unreached = sorted({int(re.search(r"experts\.(\d+)\.", n).group(1)) for n in report.uncalibrated})
    assert len(unreached) >= 12
    experts = model.model.layers[0].mlp.experts
    dense_experts = _mixtral(experts=16, top_k=1, layers=1).model.layers[0].mlp.experts  # the same seed
    for e in unreached:
        for part in ("gate_up_proj", "down_proj"):
            dense = getattr(dense_experts, part).data[e]
            keep = reference.keep_mask(dense, None, 0.5, metric="magnitude")
            assert torch.equal(getattr(experts, part).data[e], dense * keep), (e, part)
    for name, w in pruned_weights(model).items():
        assert (w == 0).sum(1).eq(reference.num_pruned(w.shape[1], 0.5)).all(), name


def test_permute_leaves_the_experts_in_their_order():
    pytest.importorskip("scipy")
    model = _mixtral(layers=2)
    report = pipeline.prune_model(model, calib_ids(), pattern="2:4", permute=True, progress=False)
    assert report.permutations or report.folded
    assert not any(".experts." in n for n in [*report.permutations, *report.folded])
    for name, w in pruned_weights(model).items():
        if ".experts." in name:  # 2:4 in the stored order
            assert (w.reshape(w.shape[0], -1, 4) != 0).sum(-1).le(2).all(), name


def _gpt_oss():
    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                    num_experts_per_tok=2, layer_types=["full_attention"] * 2)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.config.use_cache = False
    with torch.no_grad():  # give the biases values, so that leaving them out would show
        for layer in model.model.layers:
            layer.mlp.experts.gate_up_proj_bias.normal_(0, 0.5)
            layer.mlp.experts.down_proj_bias.normal_(0, 0.5)
    return model


def test_gpt_oss_layout_transposed_with_biases_uses_each_experts_inputs():
    skip_before_transformers_5("does not mark gpt-oss's expert layout (the test below)")
    model = _gpt_oss()
    experts = model.model.layers[0].mlp.experts
    assert experts.is_transposed and experts.has_bias and experts.gate_up_proj.shape == (4, 64, 64)
    calib = calib_ids(n=3)
    # By hand, on the dense model: each expert's routed hidden states, and its down projection's
    # input (the model's own gate function on gate_up with bias), summed over the calls.
    sums = {}

    def grab(module, args, kwargs):
        hidden, index = args[0], args[1]
        for e in range(4):
            routed = hidden[(index == e).any(-1)]
            inner = module._apply_gate(routed @ module.gate_up_proj[e] + module.gate_up_proj_bias[e])
            for part, seen in (("gate_up_proj", routed), ("down_proj", inner)):  # fp32 per call, fp64 over calls
                sums[(e, part)] = sums.get((e, part), 0) + (seen.float() ** 2).sum(0).double()

    handle = experts.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        for row in calib:
            model(row[None], use_cache=False)
    handle.remove()
    dense = {key: getattr(experts, key[1]).data[key[0]].t().clone() for key in sums}  # (out, in)
    pipeline.prune_model(model, calib, progress=False)
    for (e, part), sq in sums.items():
        weight = getattr(experts, part).data[e].t()  # (out, in) view of the stored (in, out)
        assert torch.equal(weight.ne(0), reference.keep_mask(dense[(e, part)], sq.sqrt().float(), 0.5)), (e, part)
    assert torch.equal(experts.gate_up_proj_bias, _gpt_oss().model.layers[0].mlp.experts.gate_up_proj_bias)


def test_gpt_oss_experts_of_transformers_4_stay_dense_and_the_warning_names_them():
    # transformers 4.x keeps gpt-oss's experts in 3-D weights without the layout flags of
    # 5.x (is_transposed, has_gate, has_bias): they are left as they are, and said so.
    if TRANSFORMERS_MAJOR >= 5:
        pytest.skip(f"transformers {transformers.__version__} marks gpt-oss's expert layout (the test above)")
    model = _gpt_oss()
    experts = [copy.deepcopy(layer.mlp.experts.state_dict()) for layer in model.model.layers]
    attention = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.warns(RuntimeWarning, match=r"hold \d+\.\d% of the weights of GptOssForCausalLM's decoder layers; the "
                                            r"rest \(modules of other kinds\) stays dense: \d+\.\d% in GptOssExperts, "):
        report = pipeline.prune_model(model, calib_ids(n=3), progress=False)
    for layer, dense in zip(model.model.layers, experts):
        assert all(torch.equal(layer.mlp.experts.state_dict()[k], v) for k, v in dense.items())
    assert report.expert_linears == 0 and report.pruned_weight_fraction < 0.5
    pruned = model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(pruned.ne(0).sum(1), torch.full((64,), 32)) and torch.equal(pruned[pruned.ne(0)],
                                                                                  attention[pruned.ne(0)])


def test_weights_outside_linear_layers_are_reported():
    model = tiny_model("llama")
    for layer in model.model.layers:  # a module of its own kind, with most of the layer's weights
        layer.mlp.register_parameter("extra", torch.nn.Parameter(torch.zeros(256, 256)))
    with pytest.warns(RuntimeWarning, match=r"hold \d+\.\d% of the weights of LlamaForCausalLM's decoder layers; the "
                                            r"rest \(modules of other kinds\) stays dense: \d+\.\d% in LlamaMLP$"):
        report = pipeline.prune_model(model, calib_ids(), progress=False)
    assert 0.3 < report.pruned_weight_fraction < 0.95
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pipeline.prune_model(tiny_model("llama"), calib_ids(), progress=False).pruned_weight_fraction == 1.0


def _llama4(experts=4, top_k=1, layers=2, step=1):
    # Llama 4's layout: the stacked, router-scaled input and (experts, in, out) weights; with
    # step 2 every other layer is dense (its own MLP of linear layers)
    torch.manual_seed(0)
    cfg = transformers.Llama4TextConfig(vocab_size=128, hidden_size=64, intermediate_size=64, intermediate_size_mlp=96,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=16, num_local_experts=experts, num_experts_per_tok=top_k,
                                        interleave_moe_layer_step=step, max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.config.use_cache = False
    return model


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_llama4_stacked_experts_equal_the_reference_loop(pattern):
    model = _llama4(experts=8, layers=4, step=2)
    twin = copy.deepcopy(model)
    calib = calib_ids(n=6)
    x, kw = first_layer_inputs(twin, calib)
    reference.sequential_prune(twin.model.layers, x, kw, pattern=pattern)
    with warnings.catch_warnings():  # an expert no token reaches (top-1 of 8) is pruned by magnitude on both sides
        warnings.simplefilter("ignore", RuntimeWarning)
        report = pipeline.prune_model(model, calib, pattern=pattern, progress=False)
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(a, b), name
    # layers 1 and 3 hold 8 experts each; the routers (nn.Linear subclasses returning scores) stay dense
    assert report.expert_linears == 2 * 8 * 2 and report.pruned_weight_fraction > 0.99
    for i in (1, 3):
        moe = model.model.layers[i].feed_forward
        assert (moe.experts.gate_up_proj == 0).float().mean() >= 0.5 and (moe.experts.down_proj == 0).float().mean() >= 0.5
        assert torch.equal(moe.router.weight, _llama4(experts=8, layers=4, step=2).model.layers[i].feed_forward.router.weight)
    for name, w in pruned_weights(model).items():
        if ".experts." in name and pattern == "2:4":  # along each output's inputs: the stored weights' dim 1
            assert (w.reshape(w.shape[0], -1, 4) != 0).sum(-1).le(2).all(), name


def test_llama4_replay_runs_each_expert_on_its_nonzero_rows_once_per_call():
    experts = _llama4().model.layers[0].feed_forward.experts
    assert is_fused_experts(experts)
    stacked = torch.randn(4, 5, 64)  # (experts, tokens, hidden)
    stacked[0, [1, 3]] = 0  # tokens the router did not send to expert 0 (scaled by 0)
    stacked[2] = 0  # expert 2: no token
    seen: dict[int, list] = {}
    with expert_linears(experts) as found:
        assert found.names == [f"{e}.{p}" for e in range(4) for p in ("gate_up_proj", "down_proj")]
        for e in range(4):
            getattr(experts, str(e)).gate_up_proj.register_forward_pre_hook(
                lambda module, args, e=e: seen.setdefault(e, []).append(args[0]))
            getattr(experts, str(e)).down_proj.register_forward_pre_hook(
                lambda module, args, e=e: seen.setdefault((e, "down"), []).append(args[0]))
        with torch.no_grad(), found.replay():
            out = experts(stacked.reshape(-1, 64))
            experts(hidden_states=stacked.reshape(-1, 64))
    want = {0: stacked[0, [0, 2, 4]], 1: stacked[1], 2: stacked[2, :0], 3: stacked[3]}
    for e, rows in want.items():
        assert len(seen[e]) == 2 and all(torch.equal(x, rows) for x in seen[e]), e
        # the down projection's input: act(gate) * up, gate columns first, as the model computes it
        gate, up = (rows @ experts.gate_up_proj[e]).chunk(2, dim=-1)
        torch.testing.assert_close(seen[(e, "down")][0], experts.act_fn(gate) * up)
    torch.testing.assert_close(out.reshape(4, 5, 64)[1], seen[(1, "down")][0] @ experts.down_proj[1])


class _SwappedExperts(torch.nn.Module):
    """Llama 4's shapes, but up and gate the other way round: not the stacked layout."""

    def __init__(self, experts):
        super().__init__()
        self.gate_up_proj, self.down_proj, self.act_fn = experts.gate_up_proj, experts.down_proj, experts.act_fn

    def forward(self, x):
        x = x.view(self.gate_up_proj.shape[0], -1, x.shape[-1])
        up, gate = torch.bmm(x, self.gate_up_proj).chunk(2, dim=-1)
        return torch.bmm(up * self.act_fn(gate), self.down_proj).view(-1, self.down_proj.shape[-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_stacked_layout_is_told_by_its_forward_not_its_shapes(dtype):
    experts = _llama4().model.layers[0].feed_forward.experts.to(dtype)
    assert is_fused_experts(experts)
    assert not is_fused_experts(_SwappedExperts(experts))  # the same shapes and names
    assert not is_fused_experts(copy.deepcopy(experts).to("meta"))  # cannot be run: not taken
    with expert_linears(_SwappedExperts(experts)) as found:
        assert found.names == []


def test_llama4_look_alike_experts_stay_dense_and_the_warning_says_so():
    model = _llama4(experts=4, layers=2)
    for layer in model.model.layers:
        layer.feed_forward.experts = _SwappedExperts(layer.feed_forward.experts)
    with pytest.warns(RuntimeWarning, match=r"hold \d+\.\d% of the weights"):
        report = pipeline.prune_model(model, calib_ids(), progress=False)
    assert report.expert_linears == 0
    assert not (model.model.layers[0].feed_forward.experts.gate_up_proj == 0).any()
