"""Data loading, checkpoints and the CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_pipeline import _assets_or_skip, calib_ids, tiny_model  # noqa: E402

from wanda_kernels.llm import checkpoint, data, models, pipeline  # noqa: E402
from wanda_kernels.llm.cli import main as cli_main  # noqa: E402

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


def test_missing_model_dir():
    with pytest.raises(FileNotFoundError, match=r"model directory /nonexistent not found"):
        models.resolve_model_path("/nonexistent")


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
    from wanda_kernels import SparseLinear

    model, report = _prune_tiny("2:4")
    checkpoint.save_pruned(model, None, tmp_path / "dense")
    checkpoint.save_compressed(model, None, tmp_path / "c", report=report)
    loaded, _ = checkpoint.load_compressed(tmp_path / "c")
    sparse = [n for n, m in loaded.named_modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == 3 * 7
    dense16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float16).eval()
    ids = calib_ids(n=2, seed=6)
    from wanda_kernels.gemm24 import op as gemm_op

    gemm_op._warn_once.cache_clear()
    with torch.no_grad(), pytest.warns(RuntimeWarning, match=r"dense F\.linear .* the input is on cpu"):
        a = loaded(ids).logits.float()  # on CPU: the documented fallback, announced once
    with torch.no_grad():
        b = dense16(ids).logits.float()
    # Same fp16 weights; the decompressed weight is exact, so only fp16 rounding of the
    # surrounding ops can differ.
    torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "c").glob("*.safetensors")}
    assert sizes["model.safetensors"] < (tmp_path / "dense" / "model.safetensors").stat().st_size / 2


def test_compressed_checkpoint_errors(tmp_path):
    model, _ = _prune_tiny("2:4")
    out = checkpoint.save_compressed(model, None, tmp_path / "c")
    blob = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is corrupt or unreadable"):
        checkpoint.load_compressed(out)
    out = checkpoint.save_compressed(model, None, tmp_path / "d")
    manifest = json.loads((out / checkpoint.MANIFEST).read_text())
    manifest["sparse_layers"]["model.layers.0.mlp.up_proj"] = [64, 256, False]
    (out / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"up_proj' is 64->256 in the manifest but 64->128 in the config"):
        checkpoint.load_compressed(out)
    (out / checkpoint.MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match=r"wanda_kernels\.json is corrupt"):
        checkpoint.load_compressed(out)
    with pytest.raises(ValueError, match=r"not a wanda_kernels 2:4 compressed checkpoint"):
        checkpoint.load_compressed(tmp_path)
    unpruned = tiny_model("llama").half()
    with pytest.raises(ValueError, match=r"no 2:4 sparse linear layer"):
        checkpoint.save_compressed(unpruned, None, tmp_path / "e")


# ---------------------------------------------------------------------------
# CLI

def _cli(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "wanda_kernels", *args], capture_output=True, text=True,
                          env=env, timeout=900)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prune", "--sparsity", "1.2", "--output", "x"], r"sparsity must be in \[0, 1\); got 1\.2"),
        (["prune", "--pattern", "3:2", "--output", "x"], r"1 <= N < M"),
        (["prune", "--model", "/nonexistent", "--output", "x"], r"model directory /nonexistent not found"),
        (["eval", "--model", "/nonexistent"], r"model directory /nonexistent not found"),
        (["prune", "--nsamples", "0", "--output", "x"], r"--nsamples must be positive"),
        (["prune", "--compressed", "--output", "x"], r"--compressed needs --pattern 2:4"),
    ],
)
def test_cli_bad_arguments_one_line(args, message, capsys):
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("wanda-kernels ")
    assert __import__("re").search(message, err), err


def test_cli_help_explains_options():
    proc = _cli("prune", "--help")
    assert proc.returncode == 0
    for option in ("--model", "--sparsity", "--pattern", "--method", "--nsamples", "--seqlen", "--output"):
        assert option in proc.stdout


def test_cli_prune_eval_demo_smoke(tmp_path):
    _assets_or_skip()
    out = tmp_path / "pruned"
    proc = _cli("prune", "--pattern", "2:4", "--nsamples", "2", "--seqlen", "32", "--output", str(out),
                "--compressed", "--eval", "--eval-tokens", "64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mean sparsity 0.5000" in proc.stdout and "perplexity:" in proc.stdout
    for target in (out, out / "compressed"):
        proc = _cli("eval", "--model", str(target), "--seqlen", "32", "--eval-tokens", "64")
        assert proc.returncode == 0 and "perplexity" in proc.stdout, proc.stderr[-3000:]
    proc = _cli("demo", "--nsamples", "2", "--seqlen", "32", "--eval-tokens", "64", "--output-dir", str(tmp_path / "d"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "d" / "demo.json").read_text())
    assert [r["run"] for r in result["results"]] == ["dense", "magnitude 50%", "wanda 50%", "magnitude 2:4",
                                                     "wanda 2:4"]
    assert (tmp_path / "d" / "demo.png").stat().st_size > 0


def test_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "wanda-kernels")
    if not os.path.exists(script):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("pip install did not create the wanda-kernels console script")
        pytest.skip("package not installed in this environment")
    proc = subprocess.run([script, "demo", "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "--nsamples" in proc.stdout and "Austen" in proc.stdout
