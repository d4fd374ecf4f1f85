"""Vision-language models: their language model is pruned, their vision encoder kept as it is.

Tiny random models of five families whose vision encoder has more blocks than their
language model (the largest list of blocks is the vision encoder's), loaded by the class
that takes the whole checkpoint; and the rule that finds the decoder layers, on toy
models shaped like the cases it must tell apart.
"""

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from test_pipeline import TRANSFORMERS_MAJOR, calib_ids, first_layer_inputs  # noqa: E402

from wanda_kernels import reference  # noqa: E402
from wanda_kernels.llm import checkpoint, models, pipeline  # noqa: E402

TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=28,
              patch_size=14)


def rope(theta=1e4, **extra):
    """Rotary settings in the installed transformers' words: 5.x's ``rope_parameters``, 4.x's
    ``rope_scaling`` and ``rope_theta`` (Qwen2.5-VL's and Mllama's text models of 4.x need
    ``rope_scaling``: they read it unconditionally)."""
    if TRANSFORMERS_MAJOR >= 5:
        return dict(rope_parameters=dict(rope_type="default", rope_theta=theta, **extra))
    return dict(rope_scaling=dict(rope_type="default", **extra), rope_theta=theta)


# family: (config, where its language model's decoder layers are)
FAMILIES = {
    "llava": (lambda: transformers.LlavaConfig(text_config=dict(model_type="llama", **TEXT), vision_config=VISION,
                                               image_token_index=5), "model.language_model.layers"),
    "mistral3": (lambda: transformers.Mistral3Config(text_config=dict(model_type="mistral", **TEXT),
                                                     vision_config=dict(head_dim=16, **VISION), image_token_index=5),
                 "model.language_model.layers"),
    "gemma3": (lambda: transformers.Gemma3Config(text_config=dict(head_dim=16, **TEXT), vision_config=VISION,
                                                 mm_tokens_per_image=4, image_token_index=5, boi_token_index=6,
                                                 eoi_token_index=7), "model.language_model.layers"),
    "qwen2_5_vl": (lambda: transformers.Qwen2_5_VLConfig(
        text_config=dict(**rope(mrope_section=[2, 3, 3]), **TEXT),
        vision_config=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64),
        image_token_id=5, video_token_id=6, vision_start_token_id=7), "model.language_model.layers"),
    "llama4": (lambda: transformers.Llama4Config(  # its text model's experts are Llama 4's stacked layout
        text_config=dict(head_dim=16, intermediate_size_mlp=96, num_local_experts=4, interleave_moe_layer_step=1,
                         **TEXT),
        vision_config=dict(vision_output_dim=64, projector_input_dim=64, projector_output_dim=64, **VISION),
        image_token_index=5), "language_model.model.layers"),
}


def tiny_vlm(family: str):
    torch.manual_seed(0)
    make, _ = FAMILIES[family]
    model = transformers.AutoModelForImageTextToText.from_config(make()).eval()
    model.config.use_cache = False
    return model


def _vision_blocks(model) -> int:
    """The number of blocks of the vision encoder's largest list."""
    lm = pipeline.find_decoder_layers(model)[0]
    return max(len(m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and not n.startswith(lm))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_decoder_layers_are_the_language_models_not_the_larger_vision_encoders(family):
    model = tiny_vlm(family)
    name, layers = pipeline.find_decoder_layers(model)
    assert name == FAMILIES[family][1] and layers is model.get_submodule(name) and len(layers) == 2
    assert _vision_blocks(model) == 4  # more blocks than the language model: the old rule's pick


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prune_model_prunes_the_language_model_and_leaves_the_vision_encoder(family):
    model = tiny_vlm(family)
    name = FAMILIES[family][1]
    inside = {id(p) for p in model.get_submodule(name).parameters()}
    outside = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in inside}
    assert any("vision" in n or "visual" in n for n in outside)
    report = pipeline.prune_model(model, calib_ids(), 0.5, progress=False)
    assert len(report.layers) == 2
    weights = {f"{i}.{n}": w for i, layer in enumerate(model.get_submodule(name))
               for n, w in pipeline.prunable_weights(layer).items()}
    assert len(weights) >= 2 * 7
    for n, w in weights.items():
        assert (w == 0).sum(1).eq(reference.num_pruned(w.shape[1], 0.5)).all(), n
    for n, p in model.named_parameters():
        if id(p) not in inside:
            assert torch.equal(p, outside[n]), n  # vision encoder, projector, embeddings: untouched


def test_a_vision_language_model_prunes_like_its_language_model_alone():
    # LLaVA's language model is a LlamaModel: the bits are the reference loop's on its layers.
    model = tiny_vlm("llava")
    twin = copy.deepcopy(model)
    calib = calib_ids(n=6)
    x, kw = first_layer_inputs(twin, calib, twin.model.language_model.layers[0])
    reference.sequential_prune(twin.model.language_model.layers, x, kw, pattern="2:4")
    pipeline.prune_model(model, calib, pattern="2:4", progress=False)
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(a, b), name


class _Block(nn.Module):
    def __init__(self, experts=0):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        if experts:
            self.experts = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8)) for _ in range(experts))


class _OtherBlock(_Block):
    pass


class _Toy(nn.Module):
    """Token embeddings in ``embed_at`` (a dotted path), blocks in ``stacks`` ({path: list})."""

    def __init__(self, embed_at: str, stacks: dict):
        super().__init__()
        self._embed_at = embed_at
        for path, blocks in stacks.items():
            self._place(path, nn.ModuleList(blocks))
        self._place(embed_at, nn.Embedding(16, 8))

    def _place(self, path, module):
        parent = self
        *outer, last = path.split(".")
        for part in outer:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(last, module)

    def get_input_embeddings(self):
        return self.get_submodule(self._embed_at)


@pytest.mark.parametrize(("embed_at", "stacks", "expected"), [
    # a vision encoder of more blocks beside the language model
    ("lm.embed", {"vision.blocks": [_Block() for _ in range(6)], "lm.layers": [_Block() for _ in range(3)]},
     "lm.layers"),
    # embeddings in a container of their own (BERT's layout): the search widens to their parent
    ("backbone.embeddings.word", {"backbone.blocks": [_Block() for _ in range(2)]}, "backbone.blocks"),
    # experts as a ModuleList inside each layer (older transformers), more of them than layers
    ("model.embed", {"model.layers": [_Block(experts=8) for _ in range(2)]}, "model.layers"),
    # no input embeddings to go by: the largest list
    (None, {"a": [_Block() for _ in range(2)], "b": [_Block() for _ in range(3)]}, "b"),
    # blocks of two kinds (Jamba's attention and Mamba layers, Mllama's cross-attention)
    ("lm.embed", {"vision.blocks": [_Block() for _ in range(6)], "lm.layers": [_Block(), _OtherBlock(), _Block()]},
     "lm.layers"),
    # beside a larger list of mixed blocks, a list of one kind comes first
    ("embed", {"mixed": [_Block(), _OtherBlock()] * 3, "layers": [_Block() for _ in range(2)]}, "layers"),
])
def test_find_decoder_layers_rule(embed_at, stacks, expected):
    if embed_at is None:
        model = nn.Module()
        for path, blocks in stacks.items():
            model.add_module(path, nn.ModuleList(blocks))
    else:
        model = _Toy(embed_at, stacks)
    assert pipeline.find_decoder_layers(model)[0] == expected


def test_layers_that_share_parameters_are_refused_by_name():
    # Zamba's hybrid layers share one transformer block: pruned layer by layer, it would be
    # pruned once per layer that uses it
    shared = nn.Linear(8, 8)
    blocks = [_Block() for _ in range(4)]
    blocks[1].shared, blocks[3].shared = shared, shared
    with pytest.raises(ValueError, match=r"decoder layers 1 and 3 of model\.layers share the parameter "
                                         r"shared\.weight \(a block shared between layers"):
        pipeline.find_decoder_layers(_Toy("model.embed", {"model.layers": blocks}))


def tiny_mllama():
    # Mllama interleaves cross-attention layers, which its forward skips without an image
    torch.manual_seed(0)
    cfg = transformers.MllamaConfig(
        text_config=dict(cross_attention_layers=[1], **rope(), **{**TEXT, "num_hidden_layers": 3}),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_global_layers=1,
                           attention_heads=2, image_size=28, patch_size=14, vision_output_dim=64,
                           intermediate_layers_indices=[0]), image_token_index=5)
    return transformers.AutoModelForImageTextToText.from_config(cfg).eval()


@pytest.mark.parametrize("method", ["wanda", "magnitude", "sparsegpt"])
def test_mllama_prunes_its_self_attention_layers_and_leaves_its_cross_attention_layers(method):
    model = tiny_mllama()
    twin = copy.deepcopy(model)
    name, layers = pipeline.find_decoder_layers(model)
    assert name == "model.language_model.layers"
    assert [type(m).__name__ for m in layers] == ["MllamaSelfAttentionDecoderLayer",
                                                  "MllamaCrossAttentionDecoderLayer",
                                                  "MllamaSelfAttentionDecoderLayer"]
    with pytest.warns(RuntimeWarning, match=r"MllamaForConditionalGeneration's forward does not call its decoder "
                                            r"layers \[1\] \(MllamaCrossAttentionDecoderLayer\) on token ids alone"):
        report = pipeline.prune_model(model, calib_ids(), pattern="2:4", method=method, progress=False)
    assert report.skipped_layers == [1] and [r.index for r in report.layers] == [0, 2]
    cross = {id(p) for p in layers[1].parameters()}
    total = sum(p.numel() for p in layers.parameters() if p.dim() >= 2)
    pruned = sum(w.numel() for i in (0, 2) for w in pipeline.prunable_weights(layers[i]).values())
    assert report.pruned_weight_fraction == pytest.approx(pruned / total)
    for (n, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        if id(a) in cross or not n.startswith(name + "."):
            assert torch.equal(a, b), n  # the cross-attention layer, the vision model: untouched
    for i in (0, 2):
        for n, w in pipeline.prunable_weights(layers[i]).items():
            assert (w.reshape(w.shape[0], -1, 4) != 0).sum(-1).le(2).all(), (i, n)
            assert (w == 0).float().mean() >= 0.5, (i, n)


def test_mllama_equals_the_reference_loop_on_the_layers_its_forward_calls():
    from test_layer_calls import real_layer_calls

    model = tiny_mllama()
    twin = copy.deepcopy(model)
    calib = calib_ids(n=4)
    layers = twin.model.language_model.layers
    x, _ = first_layer_inputs(twin, calib, layers[0])
    calls = real_layer_calls(twin, layers, calib[0], skipped=(1,))
    reference.sequential_prune([layers[0], layers[2]], x, [calls[0], calls[2]], pattern="2:4")
    with pytest.warns(RuntimeWarning, match="does not call its decoder layers"):
        pipeline.prune_model(model, calib, pattern="2:4", progress=False)
    for (n, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(a, b), n


def test_owl_gives_the_skipped_layers_no_target():
    model = tiny_mllama()
    with pytest.warns(RuntimeWarning, match="does not call its decoder layers"):
        report = pipeline.prune_model(model, calib_ids(), 0.5, owl=True, owl_lambda=0.05, progress=False)
    _, layers = pipeline.find_decoder_layers(model)
    assert report.layer_targets[1] == 0.0 and all(0.39 < report.layer_targets[i] < 0.61 for i in (0, 2))
    sizes = {i: sum(w.numel() for w in pipeline.prunable_weights(layers[i]).values()) for i in (0, 2)}
    mean = sum(report.layer_targets[i] * sizes[i] for i in sizes) / sum(sizes.values())
    assert mean == pytest.approx(0.5, abs=1e-6)  # OWL's mean over the layers it prunes


@pytest.mark.parametrize(("config", "auto"), [
    (lambda: transformers.LlamaConfig(), "AutoModelForCausalLM"),
    (lambda: transformers.Llama4TextConfig(), "AutoModelForCausalLM"),
    (lambda: transformers.LlavaConfig(), "AutoModelForImageTextToText"),
    (lambda: transformers.Llama4Config(), "AutoModelForImageTextToText"),  # not its text model alone
    (lambda: transformers.Gemma3Config(), "AutoModelForImageTextToText"),
])
def test_model_class_takes_the_whole_checkpoint(config, auto):
    assert models.model_class(config()) is getattr(transformers, auto)


def test_model_class_refuses_an_encoder_decoder_by_its_type():
    with pytest.raises(ValueError, match=r"a 't5' model \(T5Config\) is neither a causal language model nor a "
                                         "vision-language model"):
        models.model_class(transformers.T5Config())


def test_load_model_keeps_the_vision_encoder(tmp_path):
    # AutoModelForCausalLM loads Llama 4's text model alone: a saved checkpoint lost the rest.
    source = tiny_vlm("llama4")
    source.save_pretrained(tmp_path / "m")
    loaded, _ = models.load_model(tmp_path / "m", tokenizer=object())
    assert type(loaded) is type(source)
    mine, theirs = loaded.state_dict(), source.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_processor_files_are_those_present(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert models.processor_files(tmp_path) == []
    for name in ("preprocessor_config.json", "processor_config.json", "tokenizer.json"):
        (tmp_path / name).write_text("{}")
    assert models.processor_files(tmp_path) == [tmp_path / "processor_config.json",
                                                tmp_path / "preprocessor_config.json"]


@pytest.mark.parametrize("save", ["pruned", "compressed"])
def test_extra_files_are_copied_as_they_are_and_checksummed(save, tmp_path):
    model = tiny_vlm("llava")
    pipeline.prune_model(model, calib_ids(), pattern="2:4", progress=False)
    extra = tmp_path / "processor_config.json"
    extra.write_bytes(b'{"processor_class": "LlavaProcessor", "patch_size": 14}\n')
    out = tmp_path / "out"
    writer = checkpoint.save_pruned if save == "pruned" else checkpoint.save_compressed
    writer(model, None, out, extra_files=[extra])
    assert (out / extra.name).read_bytes() == extra.read_bytes()
    checkpoint.verify_checkpoint(out)
    (out / extra.name).write_bytes(b"{}")
    with pytest.raises(ValueError, match="processor_config.json"):
        checkpoint.verify_checkpoint(out)


@pytest.mark.parametrize(("names", "message"), [
    (["missing.json"], "missing.json is not a file"),
    (["config.json"], "config.json would replace the config.json the checkpoint writes itself"),
    (["model.safetensors"], "model.safetensors would replace"),
    (["a/processor_config.json", "b/processor_config.json"], "two files named 'processor_config.json'"),
])
@pytest.mark.parametrize("save", ["pruned", "compressed"])
def test_bad_extra_files_are_refused_before_anything_is_written(names, message, save, tmp_path, monkeypatch):
    model = tiny_vlm("llava")
    pipeline.prune_model(model, calib_ids(), pattern="2:4", progress=False)
    src = tmp_path / "src"
    extra = [src / n for n in names]
    for f in extra:
        if f.name != "missing.json":
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text("{}")
    monkeypatch.setattr(type(model), "save_pretrained", lambda *a, **k: pytest.fail("wrote before refusing"))
    writer = checkpoint.save_pruned if save == "pruned" else checkpoint.save_compressed
    with pytest.raises(ValueError, match=message):
        writer(model, None, tmp_path / "out", extra_files=extra)
    assert [p.name for p in tmp_path.iterdir() if p != src] == []


def _word_tokenizer():
    """A tokenizer of six words, without the built-in model's assets."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    core = Tokenizer(WordLevel({w: i for i, w in enumerate("<unk> a b c d e".split())}, unk_token="<unk>"))
    core.pre_tokenizer = Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")


def test_an_extra_file_the_tokenizer_writes_too_is_left_out_with_a_warning(tmp_path):
    model = tiny_vlm("llava")
    extra = tmp_path / "tokenizer_config.json"
    extra.write_text('{"not": "the saved tokenizer"}')
    kept = tmp_path / "processor_config.json"
    kept.write_text('{"processor_class": "LlavaProcessor"}')
    with pytest.warns(RuntimeWarning, match="tokenizer_config.json left out: the checkpoint wrote its own"):
        checkpoint.save_pruned(model, _word_tokenizer(), tmp_path / "out", extra_files=[extra, kept])
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() != extra.read_text()
    assert (tmp_path / "out" / kept.name).read_bytes() == kept.read_bytes()
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out")("a b e")["input_ids"] == [1, 2, 5]
    checkpoint.verify_checkpoint(tmp_path / "out")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_a_compressed_vision_language_model_loads_whole(family, tmp_path):
    # Loaded from a folder, as users' models are: its sub-configs then name a dtype (fp32),
    # in which transformers 4.x built those parts, whatever dtype load_compressed asked for.
    tiny_vlm(family).save_pretrained(tmp_path / "src")
    model = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "src").eval()
    pipeline.prune_model(model, calib_ids(), pattern="2:4", progress=False)
    checkpoint.save_compressed(model, None, tmp_path / "c")
    loaded, _ = checkpoint.load_compressed(tmp_path / "c")
    assert type(loaded) is type(model)
    # every part in the file's dtype (transformers 4.x built LLaVA's in its sub-configs' fp32)
    assert {p.dtype for p in loaded.parameters() if p.is_floating_point()} == {torch.float16}
    visual = {n: p for n, p in loaded.named_parameters() if n.startswith(("model.visual.", "model.vision_tower."))}
    assert visual and all(torch.equal(p, model.get_parameter(n).to(p.dtype)) for n, p in visual.items())
    ids = calib_ids(n=1)
    with torch.no_grad():
        ref = model.half()(ids).logits.float()
        got = loaded(ids).logits.float()
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)  # fp16, F.linear on the decompressed 2:4 weights
