"""Each decoder layer is called with its own arguments, as the model's own loop calls it.

Tiny random models of families whose layers get different arguments (sliding-window and
full attention with their own masks, Gemma 3's own rotary base for each kind, Llama 4's
chunked attention) with a window shorter than the calibration rows, so that the first
layer's arguments are wrong for some later layers; RecurrentGemma, whose loop passes its
arguments positionally; LLaMA, whose layers all get the same. The oracle is the test's
own: forward pre-hooks on the real layers during one forward of the real model.
"""

import copy
import warnings
from typing import NamedTuple

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from test_pipeline import calib_ids, first_layer_inputs  # noqa: E402

from wanda_kernels import reference  # noqa: E402
from wanda_kernels.llm import pipeline  # noqa: E402
from wanda_kernels.llm.layer_calls import LayerCall, capture_layer_inputs, run_layer  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
WINDOW = 4  # shorter than the calibration rows (16 tokens): sliding and full attention differ
FAMILIES = {
    "gemma2": lambda: transformers.Gemma2Config(sliding_window=WINDOW, **TINY),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"] * 2, **TINY),
    "gpt_oss": lambda: transformers.GptOssConfig(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2,
                                                 **TINY),
    "qwen2_sliding": lambda: transformers.Qwen2Config(use_sliding_window=True, sliding_window=WINDOW,
                                                      max_window_layers=2, **TINY),
    "llama4": lambda: transformers.Llama4TextConfig(attention_chunk_size=WINDOW, intermediate_size_mlp=96,
                                                    num_local_experts=4, interleave_moe_layer_step=2,
                                                    no_rope_layers=[1, 1, 1, 0], **TINY),
    "recurrent_gemma": lambda: transformers.RecurrentGemmaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, lru_width=64, attention_window_size=WINDOW,
        block_types=["recurrent", "recurrent", "attention"]),
    "jamba": lambda: transformers.JambaConfig(  # attention and Mamba layers (two kinds), mixtures of experts
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
        attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8, mamba_dt_rank=8,
        use_mamba_kernels=False),  # (transformers 4.x: else it asks for mamba-ssm's CUDA kernels)
    "llama": lambda: transformers.LlamaConfig(**TINY),
}
DIFFERING = ["gemma2", "gemma3", "gpt_oss", "qwen2_sliding", "llama4"]  # not all layers get the same arguments
CACHE_KEYS = ("past_key_values", "past_key_value", "cache", "cache_params")


def tiny(family: str):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
    model.config.use_cache = False
    return model


def real_layer_calls(model, layers, row, skipped=()):
    """``(args after the hidden states, kwargs without a cache)`` of each real layer in one
    real forward of ``row`` (None for the ``skipped`` layers, which it must not call)."""
    seen = {}

    def hook(index):
        def grab(module, args, kwargs):
            seen[index] = (tuple(args[1:]), {k: v for k, v in kwargs.items()
                                             if k != "hidden_states" and k not in CACHE_KEYS})
        return grab

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(row[None], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(seen) == [i for i in range(len(layers)) if i not in skipped]
    return [seen.get(i) for i in range(len(layers))]


def same(a, b) -> bool:
    """Equal values, tensors bit for bit, through tuples, lists and dicts."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_layer_gets_the_arguments_the_model_gives_it(family):
    model = tiny(family)
    _, layers = pipeline.find_decoder_layers(model)
    calib = calib_ids(n=3)
    real = list(layers)
    inputs, calls = capture_layer_inputs(model, layers, calib)
    assert inputs.shape == (3, 16, 64) and len(calls) == len(layers)
    assert all(isinstance(c, LayerCall) for c in calls)
    for i, (args, kwargs) in enumerate(real_layer_calls(model, layers, calib[0])):
        assert same(calls[i].args, args), i
        assert same(calls[i].kwargs, kwargs), i
    assert all(a is b for a, b in zip(layers, real, strict=True))  # the real layers are back in place
    if family in DIFFERING:  # the case this guards: the first layer's arguments are not every layer's
        assert not all(same((c.args, c.kwargs), (calls[0].args, calls[0].kwargs)) for c in calls)
    if family == "recurrent_gemma":
        assert len(calls[0].args) >= 2  # position ids and mask, positionally


@pytest.mark.parametrize("family", list(FAMILIES))
def test_layers_run_with_their_calls_give_the_models_hidden_states(family):
    model = tiny(family)
    _, layers = pipeline.find_decoder_layers(model)
    row = calib_ids(n=1)
    inputs, calls = capture_layer_inputs(model, layers, row)
    with torch.no_grad():
        hidden = model(row, output_hidden_states=True, use_cache=False).hidden_states
    h = inputs
    for i, layer in enumerate(layers):
        # the same operations on the same single row: bit for bit
        assert torch.equal(h, hidden[i]), i
        h = run_layer(layer, h, calls[i])


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "qwen2_sliding", "llama4", "recurrent_gemma", "jamba"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_prune_model_equals_the_reference_loop_with_each_layers_arguments(family, pattern):
    model = tiny(family)
    twin, first_only = copy.deepcopy(model), copy.deepcopy(model)
    calib = calib_ids(n=4)
    _, layers = pipeline.find_decoder_layers(twin)
    inputs, _ = first_layer_inputs(twin, calib, layers[0])
    calls = real_layer_calls(twin, layers, calib[0])
    reference.sequential_prune(layers, inputs, calls, pattern=pattern)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RecurrentGemma's coverage, Jamba's dt_proj: not what is tested here
        pipeline.prune_model(model, calib, pattern=pattern, progress=False)
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(a, b), name
    if family not in ("recurrent_gemma", "jamba"):  # (Jamba's Mamba layers get no mask: causal attention either way)
        # what the first layer's arguments for every layer would have given: other masks
        reference.sequential_prune(pipeline.find_decoder_layers(first_only)[1], inputs, [calls[0]] * len(calls),
                                   pattern=pattern)
        assert any(not torch.equal(a, b) for a, b in zip(first_only.parameters(), twin.parameters()))


class _Toy(nn.Module):
    """A decoder of ``blocks`` whose loop sets ``hidden = step(index, layer, hidden)`` for each layer."""

    def __init__(self, blocks, step):
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.layers = nn.ModuleList(blocks)
        self._step = step

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids) * 2
        for i, layer in enumerate(self.layers):
            h = self._step(i, layer, h)
        return h


class _Out(NamedTuple):
    hidden: torch.Tensor


class _Block(nn.Module):
    """Returns its output as a named field."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x, scale=None):
        return _Out(x + self.proj(x) * scale)


class _OtherBlock(_Block):
    pass


class _PlainBlock(_Block):
    """Returns its output as a tensor; takes (and ignores) a position and a cache too."""

    def forward(self, x, position=None, cache=None, scale=1.0, cache_params=None):
        return super().forward(x, scale).hidden


def _by_name(i, layer, h):  # a loop that reads its layers' outputs by field name: the recording cannot follow it
    return layer(h, scale=torch.tensor(0.5)).hidden


CALIB = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))


def test_a_loop_the_recording_cannot_follow_warns_and_uses_the_first_layers_arguments():
    torch.manual_seed(0)
    model = _Toy([_Block() for _ in range(3)], _by_name)
    with pytest.warns(RuntimeWarning, match=r"could not record the arguments _Toy gives each decoder layer "
                                            r"\(AttributeError.*every layer is called with those of the first"):
        inputs, calls = capture_layer_inputs(model, model.layers, CALIB)
    assert [c.kwargs for c in calls] == [calls[0].kwargs] * 3 and calls[0].args == ()
    assert torch.equal(calls[0].kwargs["scale"], torch.tensor(0.5))
    assert all(type(m) is _Block and "forward" not in vars(m) for m in model.layers)  # their own forwards are back
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # quiet when asked (every rank but the first)
        capture_layer_inputs(model, model.layers, CALIB, warn=False)
    h = inputs
    for layer in model.layers:
        h = run_layer(layer, h, calls[0])
    with torch.no_grad():
        assert torch.equal(h, model(CALIB))


class _Sliding(_PlainBlock):
    window = None  # a class default that each layer's own attribute overrides


def test_a_loop_that_asks_what_each_layer_is_gets_each_its_own_arguments():
    # transformers 4.x's Jamba gives its Mamba layers their own mask by isinstance: a
    # stand-in module in the layer's place was given the attention layers' mask, and
    # pruning failed at the first Mamba layer (had the shapes agreed, it would have gone
    # on silently with the wrong arguments).
    torch.manual_seed(0)
    blocks = [_PlainBlock(), _Sliding(), _PlainBlock(), _Sliding()]
    blocks[1].window, blocks[3].window = 2.0, 3.0

    def step(i, layer, h):
        if isinstance(layer, _Sliding):
            return layer(h, scale=torch.tensor(layer.window))
        return layer(h, position=torch.tensor(i), scale=torch.tensor(1.0))

    model = _Toy(blocks, step)
    accelerate_like = blocks[2].forward  # an instance's own forward (accelerate's hooks set one) is kept
    blocks[2].forward = accelerate_like
    inputs, calls = capture_layer_inputs(model, model.layers, CALIB)
    assert [set(c.kwargs) for c in calls] == [{"position", "scale"}, {"scale"}, {"position", "scale"}, {"scale"}]
    assert [float(c.kwargs["scale"]) for c in calls] == [1.0, 2.0, 1.0, 3.0]
    assert vars(blocks[2])["forward"] is accelerate_like
    assert all("forward" not in vars(m) for i, m in enumerate(blocks) if i != 2)
    h = inputs
    for layer, call in zip(model.layers, calls):
        h = run_layer(layer, h, call)
    with torch.no_grad():
        assert torch.equal(h, model(CALIB))


def test_layers_of_several_kinds_whose_calls_cannot_be_recorded_are_refused():
    # no layer of one kind may be called with another kind's arguments: an error, not the fallback
    model = _Toy([_Block(), _OtherBlock(), _Block()], _by_name)
    with pytest.raises(ValueError, match=r"could not record the arguments _Toy gives each of its decoder "
                                         r"layers \(AttributeError.*whose kinds differ \(_Block, _OtherBlock\)"):
        capture_layer_inputs(model, model.layers, CALIB)
    assert [type(m) for m in model.layers] == [_Block, _OtherBlock, _Block]


def test_a_cache_is_not_kept():
    class Cacheish:  # transformers' caches are recognised by their class names
        pass

    class SomeCache(Cacheish):
        pass

    model = _Toy([_PlainBlock() for _ in range(2)],
                 lambda i, layer, h: layer(h, 7, SomeCache(), scale=0.5, cache_params=SomeCache()))
    _, calls = capture_layer_inputs(model, model.layers, CALIB[:1])
    assert [(c.args, c.kwargs) for c in calls] == [((7, None), {"scale": 0.5})] * 2


@pytest.mark.parametrize("skip", [(1,), (0,), (2,), (0, 2)])
def test_a_layer_the_loop_skips_gets_no_call(skip):
    # (as Mllama's loop skips its cross-attention layers without an image)
    torch.manual_seed(0)
    model = _Toy([_PlainBlock() for _ in range(3)],
                 lambda i, layer, h: h if i in skip else layer(h, scale=torch.tensor(float(i + 1))))
    inputs, calls = capture_layer_inputs(model, model.layers, CALIB)
    assert [i for i, c in enumerate(calls) if c is None] == list(skip)
    for i, call in enumerate(calls):
        if call is not None:
            assert call.args == () and torch.equal(call.kwargs["scale"], torch.tensor(float(i + 1)))
    with torch.no_grad():
        assert torch.equal(inputs, model.embed(CALIB) * 2)  # what the first layer called gets
        h = inputs
        for layer, call in zip(model.layers, calls):
            if call is not None:
                h = run_layer(layer, h, call)
        assert torch.equal(h, model(CALIB))
