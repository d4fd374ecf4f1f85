"""The built-in default model's cached copy: one per major version of transformers.

transformers 5.x writes a config and tokenizer that 4.x misreads (``rope_parameters``,
which 4.x ignores, so SmolLM2's rotary base of 100000 became 4.x's default 10000,
silently; a tokenizer class 4.x does not have), and two virtual environments often share
one cache folder. A GGUF load that leaves weights random is refused, not cached.
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_pipeline import TRANSFORMERS_MAJOR, _assets_or_skip  # noqa: E402

from wanda_kernels.llm import models  # noqa: E402

NAME = "SmolLM2-135M-Instruct"


def _copy(folder, written_by):
    """A stand-in for a converted copy: a config naming the transformers that wrote it, and weights."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "transformers_version": written_by}))
    (folder / "model.safetensors").write_bytes(b"weights")
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder, and no GGUF package: a conversion would raise FileNotFoundError."""
    monkeypatch.setenv("WANDA_KERNELS_CACHE", str(tmp_path))

    def no_package():
        raise FileNotFoundError("no GGUF package here")

    monkeypatch.setattr(models, "_gguf_folder", no_package)
    return tmp_path


def test_the_copy_of_the_running_major_version_is_used(cache):
    own = cache / f"transformers-{TRANSFORMERS_MAJOR}" / NAME
    _copy(own, transformers.__version__)
    _copy(cache / f"transformers-{TRANSFORMERS_MAJOR + 1}" / NAME, f"{TRANSFORMERS_MAJOR + 1}.0.0")
    assert models.default_model_dir() == own


def test_an_unversioned_copy_of_the_same_major_version_is_moved_not_converted_again(cache):
    old = cache / NAME  # where earlier versions kept it
    files = _copy(old, f"{TRANSFORMERS_MAJOR}.9.0")
    path = models.default_model_dir()
    assert path == cache / f"transformers-{TRANSFORMERS_MAJOR}" / NAME
    assert sorted(p.name for p in path.iterdir()) == files and (path / "model.safetensors").read_bytes() == b"weights"
    assert not old.exists()


@pytest.mark.parametrize("other", [TRANSFORMERS_MAJOR - 1, TRANSFORMERS_MAJOR + 1])
def test_an_unversioned_copy_of_another_major_version_is_left_alone(cache, other):
    old = cache / NAME
    files = _copy(old, f"{other}.57.6")
    with pytest.raises(FileNotFoundError, match="no GGUF package here"):
        models.default_model_dir()  # a conversion of its own (here: no GGUF to convert)
    assert sorted(p.name for p in old.iterdir()) == files
    assert not (cache / f"transformers-{TRANSFORMERS_MAJOR}" / NAME).exists()


def _fake_gguf_load(monkeypatch, tmp_path, missing=(), on_tokenizer_save=None):
    """The GGUF package and transformers' two GGUF loads replaced: a tiny LLaMA whose load
    reports ``missing`` keys, and a tokenizer whose ``save_pretrained`` writes one file
    (then calls ``on_tokenizer_save``, standing in for another process)."""
    monkeypatch.setenv("WANDA_KERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_gguf_folder", lambda: tmp_path / "pkg")  # never read: both loads are stand-ins
    torch.manual_seed(0)
    tiny = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    info = {"missing_keys": list(missing), "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}

    class Tokenizer:
        def save_pretrained(self, folder):
            (folder / "tokenizer.json").write_text("ours")
            if on_tokenizer_save is not None:
                on_tokenizer_save()

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Tokenizer())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, output_loading_info=False, **k: (tiny, info) if output_loading_info else tiny)
    return tmp_path / "cache" / f"transformers-{TRANSFORMERS_MAJOR}"


def test_a_gguf_load_that_leaves_weights_random_is_refused_and_nothing_is_cached(tmp_path, monkeypatch):
    # transformers 4.46 left this GGUF's lm_head random (it did not tie it to the
    # embeddings), with one log line: a 2:4 perplexity of 85,216 instead of 174.5.
    _fake_gguf_load(monkeypatch, tmp_path, missing=["lm_head.weight"])
    with pytest.raises(RuntimeError, match=r"left \['lm_head.weight'\] of SmolLM2-135M-Instruct.Q4_1.gguf unread "
                                           r"\(random weights\); upgrade transformers"):
        models.default_model_dir()
    assert not (tmp_path / "cache").exists()


def test_a_conversion_is_written_apart_and_renamed_into_place(tmp_path, monkeypatch):
    parent = _fake_gguf_load(monkeypatch, tmp_path)
    path = models.default_model_dir()
    assert path == parent / NAME and [p.name for p in parent.iterdir()] == [NAME]  # nothing left beside it
    assert (path / "tokenizer.json").read_text() == "ours" and (path / "model.safetensors").is_file()
    assert transformers.AutoConfig.from_pretrained(path).hidden_size == 16


def test_processes_converting_at_once_keep_the_first_copy(tmp_path, monkeypatch):
    # The ranks of a first `torchrun ... prune` on a fresh cache all convert: they shared one
    # temporary folder, and every rename after the first failed ("Directory not empty").
    def another_process_finishes_first():
        _copy(parent / NAME, transformers.__version__)

    parent = _fake_gguf_load(monkeypatch, tmp_path, on_tokenizer_save=another_process_finishes_first)
    path = models.default_model_dir()
    assert path == parent / NAME and [p.name for p in parent.iterdir()] == [NAME]
    assert (path / "model.safetensors").read_bytes() == b"weights"  # the first copy, whole
    assert not (path / "tokenizer.json").exists()


def test_the_cached_config_reads_back_with_the_ggufs_rotary_base():
    # The silent failure of a shared cache: 4.x read 5.x's copy with a rotary base of 10000.
    path = _assets_or_skip()
    assert path.parent.name == f"transformers-{TRANSFORMERS_MAJOR}"
    config = models.load_config()
    theta = config.rope_parameters["rope_theta"] if TRANSFORMERS_MAJOR >= 5 else config.rope_theta
    assert theta == 100000.0
    assert json.loads((path / "config.json").read_text())["transformers_version"].split(".")[0] == str(
        TRANSFORMERS_MAJOR)
