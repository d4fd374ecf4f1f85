"""Data loading, checkpoints and the CLI."""

import copy
import json
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

transformers = pytest.importorskip("transformers")

from test_pipeline import _assets_or_skip, calib_ids, tiny_model  # noqa: E402

from wanda_kernels.llm import checkpoint, data, models, pipeline, safe_io  # noqa: E402

# ---------------------------------------------------------------------------
# Data

def test_austen_corpus():
    _assets_or_skip()
    texts = data.austen_texts()
    assert list(texts) == list(data.AUSTEN_NOVELS)
    assert texts["emma"].startswith("EMMA") and "Woodhouse" in texts["emma"]
    assert "Elizabeth" in texts["prideprejudice"] and len(texts["prideprejudice"]) > 600_000
    calib = data.load_corpus(split="calib")
    assert "Woodhouse" not in calib and "Elinor" in calib  # Emma is held out


def test_windows_are_seeded_and_non_overlapping(tmp_path):
    _assets_or_skip()
    tok = transformers.AutoTokenizer.from_pretrained(models.default_model_dir())
    text_file = tmp_path / "t.txt"
    text_file.write_text("It is a truth universally acknowledged. " * 400)
    calib = data.load_corpus(text_file, split="calib")
    a = data.sample_windows(tok, calib, 8, 32, seed=3)
    assert a.shape == (8, 32) and a.dtype == torch.long
    assert torch.equal(a, data.sample_windows(tok, calib, 8, 32, seed=3))
    assert not torch.equal(a, data.sample_windows(tok, calib, 8, 32, seed=4))
    ev = data.eval_windows(tok, data.load_corpus(text_file, split="eval"), 16)
    ids = tok(data.load_corpus(text_file, split="eval"), add_special_tokens=False)["input_ids"]
    assert ev.reshape(-1).tolist() == ids[: ev.numel()] and ev.numel() > len(ids) - 16


def test_missing_corpus_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDA_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setenv("WANDA_KERNELS_AUSTEN_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setattr(data, "_DATA_SUBDIR", data.Path("not/there"))
    with pytest.raises(FileNotFoundError, match=r"tools/install_assets\.sh"):
        data.austen_dir()


def test_data_refusals(tmp_path):
    with pytest.raises(ValueError, match=r"split must be 'calib' or 'eval'"):
        data.load_corpus(split="train")
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        data.load_corpus(tmp_path / "missing.txt", split="calib")


def test_missing_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model directory /nonexistent does not exist"):
        models.resolve_model_path("/nonexistent")
    with pytest.raises(FileNotFoundError, match=r"exists but has no config\.json"):
        models.resolve_model_path(tmp_path)


# ---------------------------------------------------------------------------
# Checkpoints

def _prune_tiny(pattern):
    model = tiny_model("llama")
    report = pipeline.prune_model(model, calib_ids(), pattern=pattern, progress=False)
    return model, report


def test_save_reload_identical_logits(tmp_path):
    model, report = _prune_tiny("unstructured")
    ids = calib_ids(n=2, seed=5)
    with torch.no_grad():
        expected = model(ids).logits
    checkpoint.save_pruned(model, None, tmp_path, report=report)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)
    manifest = json.loads((tmp_path / checkpoint.MANIFEST).read_text())
    assert manifest["report"]["method"] == "wanda" and len(manifest["report"]["layers"]) == 3


def test_compressed_24_checkpoint_loads_into_sparse_linear(tmp_path):
    from wanda_kernels import SparseLinear, _warn

    model, report = _prune_tiny("2:4")
    checkpoint.save_pruned(model, None, tmp_path / "dense")
    checkpoint.save_compressed(model, None, tmp_path / "c", report=report)
    _warn.forget()
    # On CPU: the documented fallback, announced once, at load time (before any progress
    # bar of the caller), for the whole model, and attributed to the caller's line.
    with pytest.warns(RuntimeWarning, match=r"the model's 21 SparseLinear layers run dense F\.linear .* the input "
                                            r"is on cpu") as record:
        loaded, _ = checkpoint.load_compressed(tmp_path / "c")
    assert len(record) == 1 and record[0].filename == __file__
    sparse = [n for n, m in loaded.named_modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == 3 * 7
    dense16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float16).eval()
    ids = calib_ids(n=2, seed=6)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # said once already: the forward passes stay silent
        a = loaded(ids).logits.float()
    with torch.no_grad():
        b = dense16(ids).logits.float()
    # Same fp16 weights; the decompressed weight is exact, so only fp16 rounding of the
    # surrounding ops can differ.
    torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "c").glob("*.safetensors")}
    assert sizes["model.safetensors"] < (tmp_path / "dense" / "model.safetensors").stat().st_size / 2


@pytest.mark.parametrize("pattern", ["unstructured", "4:8"])
def test_compressed_bitmap_checkpoint_loads_into_bitmap_linear(tmp_path, pattern):
    from safetensors import safe_open

    from wanda_kernels import BitmapLinear, _warn

    model, report = _prune_tiny(pattern)
    checkpoint.save_pruned(model, None, tmp_path / "dense")
    checkpoint.save_compressed(model, None, tmp_path / "c", format="bitmap", report=report, progress=False)
    manifest = json.loads((tmp_path / "c" / checkpoint.MANIFEST).read_text())
    assert manifest["format"] == "wanda-kernels-bitmap-compressed" and len(manifest["sparse_layers"]) == 21
    assert checkpoint.compressed_format(tmp_path / "c") == "bitmap" and checkpoint.is_compressed_checkpoint(tmp_path / "c")
    _warn.forget()
    with pytest.warns(RuntimeWarning, match=r"the model's 21 BitmapLinear layers run dense F\.linear .* on cpu"):
        loaded, _ = checkpoint.load_compressed(tmp_path / "c")
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, BitmapLinear)}
    assert len(layers) == 21 and all(m.row_offsets is None for m in layers.values())  # Wanda: equal rows
    dense16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float16).eval()
    ids = calib_ids(n=2, seed=6)
    with torch.no_grad():
        # The decompressed weights are the fp16 pruned weights bit for bit, and the CPU
        # fallback is F.linear on them: the same logits, exactly.
        assert torch.equal(loaded(ids).logits, dense16(ids).logits)
    # Stored: fp16 values of the kept half plus one bit per weight for every sparse layer.
    with safe_open(str(tmp_path / "c" / "model.safetensors"), "pt") as f:
        for name, (in_f, out_f, *_) in manifest["sparse_layers"].items():
            values, bits = f.get_tensor(f"{name}.values"), f.get_tensor(f"{name}.bitmap")
            assert values.shape == (out_f, in_f // 2) and bits.shape == (out_f, -(-in_f // 32))
            stored = values.numel() * 2 + bits.numel() * 4
            assert stored / (out_f * in_f * 2) == 0.5 + 4 * -(-in_f // 32) / (2 * in_f)  # 0.5625 when in % 32 == 0


@pytest.mark.parametrize(("fmt", "pattern", "permute"), [("2:4", "2:4", False), ("2:4", "2:4", True),
                                                    ("bitmap", "unstructured", False)])
def test_compressed_checkpoints_of_gpt2_hold_its_conv1d_layers(tmp_path, fmt, pattern, permute):
    # GPT-2's linear layers are transformers' Conv1D (weight stored (in, out)): they are
    # pruned, and must be stored compressed and load back as sparse modules, not refused
    # with "no pruned linear layer" after the pruning is done.
    from wanda_kernels import BitmapLinear, SparseLinear

    module_cls = SparseLinear if fmt == "2:4" else BitmapLinear
    model = tiny_model("gpt2")
    report = pipeline.prune_model(model, calib_ids(), pattern=pattern, permute=permute, progress=False)
    assert bool(report.permutations) == permute
    checkpoint.save_pruned(model, None, tmp_path / "dense")
    checkpoint.save_compressed(model, None, tmp_path / "c", format=fmt, report=report, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU fallback's warning (tested above)
        loaded, _ = checkpoint.load_compressed(tmp_path / "c")
    sparse = {n: m for n, m in loaded.named_modules() if isinstance(m, module_cls)}
    assert sorted(sparse) == sorted(f"transformer.h.{i}.{n}" for i in range(3)
                                    for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert (sparse["transformer.h.0.mlp.c_fc"].in_features, sparse["transformer.h.0.mlp.c_fc"].out_features) == (64, 256)
    assert sum(getattr(m, "perm", None) is not None for m in sparse.values()) == len(report.permutations)
    dense16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float16).eval()
    ids = calib_ids(n=2, seed=6)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = loaded(ids).logits.float(), dense16(ids).logits.float()
    # The same fp16 weights; Conv1D's addmm and the fallback's F.linear (on permuted
    # inputs, for permuted layers) may add in different orders: fp16 rounding only.
    torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


class _OpsOnShapes(TorchDispatchMode):
    """Every aten op that reads or returns a CPU tensor of one of ``shapes``: (op, devices of its results)."""

    def __init__(self, shapes):
        super().__init__()
        self.wanted, self.ops = set(shapes), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves((args, kwargs, result)) if isinstance(t, torch.Tensor)]
        if any(t.device.type == "cpu" and tuple(t.shape) in self.wanted for t in tensors):
            self.ops.append((str(func), {t.device.type for t in tree_leaves(result) if isinstance(t, torch.Tensor)}))
        return result


@pytest.mark.parametrize(("fmt", "pattern"), [("bitmap", "unstructured"), ("2:4", "2:4")])
def test_loading_a_compressed_checkpoint_never_materialises_a_dense_sparse_weight(tmp_path, fmt, pattern):
    # Vocabulary 96 and 192 MLP channels, so neither the dense parameters (embedding (96, 64),
    # tied to the output layer; norms (64,)) nor the stored tensors have the shape of a
    # decoder linear's weight ((64, 64), (32, 64), (192, 64), (64, 192)): a CPU op on a tensor of such a shape while loading touches a dense copy of
    # a sparse weight. The only ones allowed: nn.Linear's constructor allocating its weight
    # uninitialised (torch.empty, no page written) and it going to the meta device at once.
    # Building the model from its config, as before, initialised each one at random on the
    # CPU (uniform_) and so needed the dense model's memory and time.
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    report = pipeline.prune_model(model, ids, pattern=pattern, progress=False)
    out = checkpoint.save_compressed(model, None, tmp_path / "c", format=fmt, report=report, progress=False)
    sparse = [m.weight for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    dense_shapes = {tuple(p.shape) for p in model.parameters() if all(p is not w for w in sparse)}
    weight_shapes = {tuple(w.shape) for w in sparse} - dense_shapes
    assert weight_shapes == {(64, 64), (32, 64), (192, 64), (64, 192)}
    with warnings.catch_warnings(), _OpsOnShapes(weight_shapes) as seen:
        warnings.simplefilter("ignore")  # the CPU fallback's warning
        loaded, _ = checkpoint.load_compressed(out)
    ops = {(op, frozenset(devices)) for op, devices in seen.ops}
    assert ops == {("aten.empty.memory_format", frozenset({"cpu"})), ("aten._to_copy.default", frozenset({"meta"}))}
    assert sum(op == "aten.empty.memory_format" for op, _ in seen.ops) == len(sparse)  # one per layer, no more
    # Nothing left on the meta device, the embedding tied again, and the same logits.
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    checkpoint.save_pruned(model, None, tmp_path / "dense")
    dense16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float16).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, want = loaded(ids[:2]).logits.float(), dense16(ids[:2]).logits.float()
    # Bitmap on CPU: F.linear on the exact fp16 weights, so the same logits; 2:4 as in
    # test_compressed_24_checkpoint_loads_into_sparse_linear.
    torch.testing.assert_close(got, want, rtol=0 if fmt == "bitmap" else 1e-2, atol=0 if fmt == "bitmap" else 1e-2)


def test_the_cpu_copy_for_saving_is_made_in_the_stored_dtype_only():
    # save_compressed's copy: what deepcopy(model).to("cpu", fp16) gives, bit for bit, ties
    # kept, the model untouched; but no fp32 copy of any weight on the way (the old way
    # cloned the whole model on its own device and in its own dtype first).
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    with _OpsOnShapes(shapes) as seen:
        copied = checkpoint._cpu_copy(model, torch.float16)
    made = {op for op, _ in seen.ops}
    assert made and made <= {"aten._to_copy.default", "aten.detach.default"}  # one fp16 copy per tensor, no clone
    want = copy.deepcopy(model).to("cpu", torch.float16).state_dict()
    got = copied.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype
                                             for k in want)
    assert copied.lm_head.weight is copied.model.embed_tokens.weight
    assert all(torch.equal(v, before[k]) and v.dtype == torch.float32 for k, v in model.state_dict().items())


def test_a_damaged_bitmap_checkpoint_is_refused_naming_the_layer(tmp_path):
    from safetensors.torch import load_file, save_file

    model, _ = _prune_tiny("unstructured")
    out = checkpoint.save_compressed(model, None, tmp_path / "c", format="bitmap", progress=False)
    tensors = load_file(str(out / "model.safetensors"))
    tensors["model.layers.1.mlp.down_proj.bitmap"][3, 0] ^= 1  # one bit flipped: row 3 no longer matches its values
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.safetensors: BitmapLinear model\.layers\.1\.mlp\.down_proj: "
                                         r"bitmap row 3 has \d+ set bits but \d+ values are stored for it"):
        checkpoint.load_compressed(out, verify=False)  # (verify=True names the file as damaged first)
    with pytest.raises(ValueError, match=r"model\.safetensors is damaged"):
        checkpoint.load_compressed(out)
    with pytest.raises(ValueError, match=r"format must be one of '2:4', 'bitmap'; got 'csr'"):
        checkpoint.save_compressed(model, None, tmp_path / "d", format="csr")
    with pytest.raises(ValueError, match=r"no pruned linear layer to store in the bitmap format"):
        checkpoint.save_compressed(tiny_model("llama").half(), None, tmp_path / "e", format="bitmap")


def test_compressed_checkpoint_errors(tmp_path):
    model, _ = _prune_tiny("2:4")
    out = checkpoint.save_compressed(model, None, tmp_path / "c")
    blob = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is damaged"):
        checkpoint.load_compressed(out)
    with pytest.raises(ValueError, match=r"model\.safetensors is corrupt or unreadable"):
        checkpoint.load_compressed(out, verify=False)
    out = checkpoint.save_compressed(model, None, tmp_path / "d")
    manifest = json.loads((out / checkpoint.MANIFEST).read_text())
    manifest["sparse_layers"]["model.layers.0.mlp.up_proj"] = [64, 256, False]
    (out / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"up_proj' is 64->256 in the manifest but 64->128 in the config"):
        checkpoint.load_compressed(out)
    (out / checkpoint.MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match=r"wanda_kernels\.json is corrupt"):
        checkpoint.load_compressed(out)
    with pytest.raises(ValueError, match=r"not a wanda_kernels compressed checkpoint \(no wanda_kernels\.json with "
                                         r"format 'wanda-kernels-2:4-compressed' or 'wanda-kernels-bitmap-compressed'"):
        checkpoint.load_compressed(tmp_path)
    unpruned = tiny_model("llama").half()
    with pytest.raises(ValueError, match=r"no pruned linear layer to store in the 2:4 format; prune it with "
                                         r"pattern='2:4' first"):
        checkpoint.save_compressed(unpruned, None, tmp_path / "e")


# ---------------------------------------------------------------------------
# Writing folders: checked up front, staged, checksummed


def test_check_output_dir(tmp_path):
    assert safe_io.check_output_dir(tmp_path / "new") == tmp_path / "new"  # absent: fine
    (tmp_path / "empty").mkdir()
    safe_io.check_output_dir(tmp_path / "empty")  # empty: fine
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a.txt").write_text("x")
    with pytest.raises(FileExistsError, match=r"full is a folder that is not empty \(1 entries: a\.txt\); pass "
                                              r"overwrite=True to replace it"):
        safe_io.check_output_dir(tmp_path / "full")
    safe_io.check_output_dir(tmp_path / "full", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match=r"file is an existing file, not a folder"):
        safe_io.check_output_dir(tmp_path / "file", overwrite=True)
    with pytest.raises(NotADirectoryError, match=r"file is a file, so no folder can be created under it"):
        safe_io.check_output_dir(tmp_path / "file" / "deeper" / "out")


def test_staged_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"), safe_io.staged_dir(out, overwrite=True) as stage:
        (stage / "new.txt").write_text("half")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "old.txt").read_text() == "old"
    with safe_io.staged_dir(out, overwrite=True) as stage:
        assert stage.parent == tmp_path and not (out / "new.txt").exists()  # invisible until complete
        (stage / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]  # replaced as a whole, never mixed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_save_pruned_refuses_a_non_empty_folder_and_keeps_it(tmp_path):
    model, report = _prune_tiny("unstructured")
    (tmp_path / "config.json").write_text('{"user": "mine"}')
    with pytest.raises(FileExistsError, match="not empty"):
        checkpoint.save_pruned(model, None, tmp_path, report=report)
    assert (tmp_path / "config.json").read_text() == '{"user": "mine"}' and len(list(tmp_path.iterdir())) == 1
    checkpoint.save_pruned(model, None, tmp_path, report=report, overwrite=True)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"
    checkpoint.verify_checkpoint(tmp_path)


def test_verify_checkpoint(tmp_path):
    model, report = _prune_tiny("2:4")
    out = checkpoint.save_compressed(model, None, tmp_path / "c", report=report, progress=False)
    checkpoint.verify_checkpoint(out)
    blob = bytearray((out / "model.safetensors").read_bytes())
    blob[-1] ^= 1
    (out / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"c/model\.safetensors is damaged"):
        checkpoint.verify_checkpoint(out)
    with pytest.raises(ValueError, match=r"c/model\.safetensors is damaged"):
        checkpoint.load_compressed(out)
    # A manifest written before checksums (version 1) still loads, with a warning saying so.
    manifest = json.loads((out / checkpoint.MANIFEST).read_text())
    del manifest["files"]
    manifest["version"] = 1
    (out / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    with pytest.warns(RuntimeWarning, match="records no checksums"):
        checkpoint.verify_checkpoint(out)
    manifest["version"] = 7
    (out / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="version 7 is not supported"):
        checkpoint.verify_checkpoint(out)
    with pytest.raises(ValueError, match="has no wanda_kernels.json"):
        checkpoint.verify_checkpoint(tmp_path)


def test_save_compressed_compresses_each_layer_once(tmp_path, monkeypatch):
    from wanda_kernels import sparse_linear

    calls = []
    real = sparse_linear.compress_24
    monkeypatch.setattr(sparse_linear, "compress_24", lambda w, **k: calls.append(w.shape) or real(w, **k))
    model, _ = _prune_tiny("2:4")
    checkpoint.save_compressed(model, None, tmp_path / "c", progress=False)
    assert len(calls) == 3 * 7  # one per linear layer


# ---------------------------------------------------------------------------
# The demo's chart


def test_demo_chart_groups_by_pattern_with_dense_as_a_line(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from wanda_kernels.llm import demo

    rows = [dict(run=label, method=method, pattern=pattern or "-", perplexity=ppl, prune_seconds=None)
            for (method, pattern, label, _), ppl in zip(demo.DEMO_RUNS, [36.5, 388.1, 66.2, 1174.2, 163.9, 114.9])]
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look at it
    path = demo.bar_chart(rows, tmp_path / "demo.png", "SmolLM2-135M-Instruct (135M) on Emma")
    assert path.stat().st_size > 0
    (fig,) = figures
    (ax,) = fig.axes
    assert ax.get_title() == "SmolLM2-135M-Instruct (135M) on Emma: perplexity after pruning"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["50% unstructured", "2:4 (50%)"]
    assert len(ax.patches) == 5 and sorted(p.get_height() for p in ax.patches) == [66.2, 114.9, 163.9, 388.1, 1174.2]
    (dense,) = ax.get_lines()
    assert list(dense.get_ydata()) == [36.5, 36.5] and "dense" in dense.get_label()
    fig.canvas.draw()
    frame = ax.get_window_extent()
    for text in [t for t in ax.texts] + [ax.title]:  # the value labels and the title stay inside the figure
        box = text.get_window_extent()
        assert box.y1 <= fig.bbox.y1 and (text is ax.title or box.y1 <= frame.y1), text.get_text()
