"""The ``wanda-kernels`` command as a user runs it: bad inputs, checkpoints, nothing lost.

Every bad input runs the real command (``python -m wanda_kernels``) and checks exit
status 2, one line on stderr naming the problem, no traceback, and that no file was
created or changed. In-process runs (``cli.main``) with the loaders replaced check that
those refusals come before anything is loaded.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_pipeline import _assets_or_skip, skip_before_transformers_5  # noqa: E402

from wanda_kernels.llm import checkpoint, cli, models, pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune must be in want " \
       "of a wife. However little known the feelings or views of such a man may be on his first entering a " \
       "neighbourhood, this truth is so well fixed in the minds of the surrounding families. " * 60


def _cli(*args, cwd=None, warnings_on=False, launcher=(), env=None):
    """``python [launcher...] -m wanda_kernels args...`` (launcher: e.g. torch.distributed.run's options)."""
    env = {**os.environ, **(env or {})}
    if not warnings_on:
        env["PYTHONWARNINGS"] = "ignore"
    return subprocess.run([sys.executable, *launcher, "-m", "wanda_kernels", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=900, cwd=cwd)


def _snapshot(folder: Path) -> dict:
    """Every file and folder under ``folder`` (hidden ones included) with its content hash."""
    return {p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(folder.rglob("*"))}


def _assert_usage_error(proc, pattern):
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and err.startswith("wanda-kernels ")
    assert "error: '" not in err and 'error: "' not in err  # the message itself, not its repr
    assert re.search(pattern, err), err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny LLaMA with the built-in model's tokenizer: the real command, in seconds."""
    default = _assets_or_skip()
    out = tmp_path_factory.mktemp("tiny-llama")
    tok = transformers.AutoTokenizer.from_pretrained(default)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "austen.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture
def workspace(tmp_path):
    """A folder holding what the bad inputs point at."""
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text('{"mine": true}')
    (tmp_path / "full" / "notes.txt").write_text("keep me")
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "latin1.txt").write_bytes(b"Hello \xd0 world, " * 50)
    (tmp_path / "no_config").mkdir()
    (tmp_path / "no_config" / "weights.bin").write_bytes(b"\0")
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text('{"model_type": "t5"}')
    return tmp_path


BAD_INPUTS = [
    (["prune", "--output", "{ws}/new", "--sparsity", "1.2"], r"error: sparsity must be in \[0, 1\); got 1\.2$"),
    (["prune", "--output", "{ws}/new", "--pattern", "3:2"], r"error: pattern '3:2': need 1 <= N < M"),
    (["prune", "--output", "{ws}/new", "--nsamples", "0"], r"error: --nsamples must be positive; got 0"),
    (["prune", "--output", "{ws}/new", "--compressed", "--sparsity", "0.2"],
     r"error: --compressed stores layers with at least 0.25 sparsity in the bitmap format; --sparsity 0.2 is below it"),
    (["prune", "--output", "{ws}/new", "--owl", "--pattern", "2:4"],
     r"error: owl=True gives each decoder layer its own sparsity, but pattern='2:4' fixes every layer's"),
    (["prune", "--output", "{ws}/new", "--owl", "--sparsity", "0.7", "--owl-lambda", "0.2"],
     r"error: owl_lambda must be in \[0, 0\.15\) at sparsity 0\.7"),
    (["prune", "--output", "{ws}/new", "--permute"], r"error: permute=True reorders input channels so that N:M groups"),
    (["prune", "--output", "{ws}/new", "--dsnot", "--method", "sparsegpt"],
     r"error: dsnot=True refines a Wanda \(or RIA\) mask without a weight update; got method='sparsegpt'"),
    (["prune", "--output", "{ws}/new", "--metric", "ria", "--method", "magnitude"],
     r"error: metric='ria' does not apply to method='magnitude'"),
    (["prune", "--output", "{ws}/full"], r"error: --output .*/full is a folder that is not empty \(2 entries: "
                                         r"config\.json, notes\.txt\); give --overwrite to replace it"),
    (["prune", "--output", "{ws}/a_file"], r"error: --output .*/a_file is an existing file, not a folder"),
    (["prune", "--output", "{ws}/a_file/sub"], r"error: --output .*/a_file/sub: .*/a_file is a file"),
    (["prune", "--output", "{ws}/a_file", "--overwrite"], r"error: --output .*/a_file is an existing file"),
    (["prune", "--output", "{ws}/new", "--device", "tpu"], r"error: --device tpu: not a device; give auto, cpu, "
                                                           r"cuda or cuda:N$"),
    (["prune", "--output", "{ws}/new", "--device", "cuda:7"], r"error: --device cuda:7: "),
    (["prune", "--output", "{ws}/new", "--text", "{ws}/missing.txt"],
     r"error: --text: text file .*/missing\.txt does not exist$"),
    (["prune", "--output", "{ws}/new", "--text", "{ws}/latin1.txt"],
     r"error: --text: text file .*/latin1\.txt is not UTF-8 text: byte 0xd0 at offset 6 cannot be decoded"),
    (["prune", "--output", "{ws}/new", "--text", "{ws}/no_config"], r"error: --text: text file .* is a folder"),
    (["prune", "--output", "{ws}/new", "--model", "{ws}/nowhere"],
     r"error: --model: model directory .*/nowhere does not exist; give a local Hugging Face model folder"),
    (["prune", "--output", "{ws}/new", "--model", "{ws}/no_config"],
     r"error: --model: model directory .*/no_config exists but has no config\.json"),
    (["prune", "--output", "{ws}/new", "--model", "{ws}/a_file"], r"error: --model: model .*/a_file is a file, not "
                                                                  r"a folder"),
    (["prune", "--output", "{ws}/new", "--model", "{ws}/t5"],
     r"error: --model: a 't5' model \(T5Config\) is neither a causal language model nor a vision-language model"),
    (["eval", "--model", "{ws}/t5"], r"error: --model: a 't5' model \(T5Config\) is neither"),
    (["eval", "--device", "tpu"], r"error: --device tpu: not a device"),
    (["eval", "--text", "{ws}/latin1.txt"], r"error: --text: text file .*/latin1\.txt is not UTF-8 text"),
    (["eval", "--eval-tokens", "-5"], r"error: --eval-tokens must be positive; got -5"),
    (["demo", "--output-dir", "{ws}/a_file"], r"error: --output-dir .*/a_file is an existing file, not a folder"),
    (["demo", "--seqlen", "0"], r"error: --seqlen must be positive; got 0"),
]


def _fill(args, ws, model_dir):
    """The command line of a case: paths in the workspace, and the tiny model unless the case names one."""
    out = [a.replace("{ws}", str(ws)) for a in args]
    return out if "--model" in out else [*out, "--model", str(model_dir)]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS, ids=[" ".join(a[:1] + a[3:]) for a, _ in BAD_INPUTS])
def test_bad_input_one_line_exit_2_nothing_written(args, message, workspace, model_dir):
    if "cuda:7" in args and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    before, model_before = _snapshot(workspace), _snapshot(model_dir)
    proc = _cli(*_fill(args, workspace, model_dir))
    _assert_usage_error(proc, message)
    assert _snapshot(workspace) == before and _snapshot(model_dir) == model_before


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS, ids=[" ".join(a[:1] + a[3:]) for a, _ in BAD_INPUTS])
def test_refused_before_anything_is_loaded(args, message, workspace, model_dir, monkeypatch, capsys):
    # The same refusals, in process, with every loader replaced by a failure: they come
    # first, not after a model load of many seconds.
    def loaded(*a, **k):
        pytest.fail("loaded something before refusing a bad command line")

    for name in ("load_tokenizer", "load_model", "default_model_dir"):
        monkeypatch.setattr(models, name, loaded)
    monkeypatch.setattr(pipeline, "prune_model", loaded)
    filled = _fill(args, workspace, model_dir)
    assert cli.main(filled) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_unwritable_output_is_refused_up_front(workspace, model_dir, monkeypatch, capsys):
    # (Tests run as root here, for whom every folder is writable: os.access stands in.)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == workspace else real_access(p, mode))
    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: pytest.fail("loaded before refusing"))
    assert cli.main(["prune", "--model", str(model_dir), "--output", str(workspace / "new")]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"wanda-kernels prune: error: --output {re.escape(str(workspace))}/new: no permission to "
                        rf"write in {re.escape(str(workspace))}", err), err


# ---------------------------------------------------------------------------
# A pruned checkpoint, written once by the real command, then damaged, overwritten, evaluated


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, model_dir, text_file):
    out = tmp_path_factory.mktemp("pruned") / "out"
    proc = _cli("prune", "--model", model_dir, "--text", text_file, "--pattern", "2:4", "--nsamples", "4",
                "--seqlen", "32", "--output", out, "--compressed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compressing 2:4 layers" in proc.stderr  # the progress bar of the compression
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging folder left
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_manifests_record_a_checksum_of_every_file(pruned):
    for folder in (pruned, pruned / "compressed"):
        manifest = json.loads((folder / checkpoint.MANIFEST).read_text())
        files = {p.relative_to(folder).as_posix() for p in folder.iterdir() if p.is_file()} - {checkpoint.MANIFEST}
        assert manifest["version"] == 2 and set(manifest["files"]) == files and "model.safetensors" in files
        for name, digest in manifest["files"].items():
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest


def test_prune_onto_its_own_output_is_refused_and_changes_nothing(pruned, model_dir):
    before = _snapshot(pruned.parent)
    proc = _cli("prune", "--model", model_dir, "--output", pruned)
    _assert_usage_error(proc, r"is a folder that is not empty .* give --overwrite to replace it, or give a new folder")
    assert _snapshot(pruned.parent) == before


def test_overwrite_replaces_the_whole_folder(pruned, model_dir, text_file, tmp_path):
    target = _copy(pruned, tmp_path / "out")
    (target / "stale.txt").write_text("from an earlier run")
    proc = _cli("prune", "--model", model_dir, "--text", text_file, "--nsamples", "4", "--seqlen", "32",
                "--output", target, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {p.name for p in target.iterdir()}
    assert "stale.txt" not in names and "compressed" not in names and "model.safetensors" in names
    assert json.loads((target / checkpoint.MANIFEST).read_text())["report"]["pattern"] == "unstructured"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or old folder left beside it


@pytest.mark.parametrize("damaged", ["model.safetensors", "compressed/model.safetensors", "compressed/config.json"])
def test_eval_names_a_damaged_file(pruned, tmp_path, damaged):
    target = _copy(pruned, tmp_path / "out")
    file = target / damaged
    blob = bytearray(file.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte: still loads, silently wrong
    file.write_bytes(bytes(blob))
    model = target / "compressed" if damaged.startswith("compressed") else target
    proc = _cli("eval", "--model", model, "--seqlen", "32", "--eval-tokens", "64")
    _assert_usage_error(proc, rf"{re.escape(str(file))} is damaged: its sha256 differs from the one recorded in "
                              rf".*wanda_kernels\.json")


def test_prune_of_a_damaged_pruned_checkpoint_names_the_file_and_writes_nothing(pruned, tmp_path):
    # Pruning a checkpoint further (say 2:4, then more) starts from verified weights.
    target = _copy(pruned, tmp_path / "out")
    file = target / "config.json"
    file.write_text(file.read_text().replace('"hidden_size": 64', '"hidden_size": 65'))
    proc = _cli("prune", "--model", target, "--nsamples", "2", "--seqlen", "16", "--output", tmp_path / "again")
    _assert_usage_error(proc, rf"{re.escape(str(file))} is damaged: its sha256 differs")
    assert not (tmp_path / "again").exists()


def test_eval_names_a_missing_file(pruned, tmp_path):
    target = _copy(pruned, tmp_path / "out")
    (target / "compressed" / "model.safetensors").unlink()
    proc = _cli("eval", "--model", target / "compressed")
    _assert_usage_error(proc, r"compressed/model\.safetensors is missing: .*wanda_kernels\.json lists it")


def test_eval_of_a_compressed_checkpoint_warns_once_before_the_bar(pruned, text_file):
    proc = _cli("eval", "--model", pruned / "compressed", "--text", text_file, "--seqlen", "32", "--eval-tokens",
                "256", warnings_on=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "perplexity" in proc.stdout
    warning_lines = [line for line in proc.stderr.splitlines() if "SparseLinear" in line]
    assert len(warning_lines) == 1, proc.stderr
    assert warning_lines[0].startswith("wanda-kernels: warning: the model's 14 SparseLinear layers run dense F.linear")
    assert "custom_ops" not in proc.stderr and "Traceback" not in proc.stderr
    bar = proc.stderr.find("perplexity:")
    assert bar == -1 or proc.stderr.find("SparseLinear") < bar  # before the evaluation's progress bar


def test_eval_refuses_another_dtype_for_a_compressed_checkpoint(pruned):
    proc = _cli("eval", "--model", pruned / "compressed", "--dtype", "fp32")
    _assert_usage_error(proc, r"--dtype fp32: .* is a 2:4 compressed checkpoint stored in float16; leave --dtype auto")


def test_prune_compressed_unstructured_writes_the_bitmap_format_with_the_same_perplexity(model_dir, text_file,
                                                                                        tmp_path):
    out = tmp_path / "out"
    proc = _cli("prune", "--model", model_dir, "--text", text_file, "--nsamples", "4", "--seqlen", "32",
                "--output", out, "--compressed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"writing the bitmap compressed checkpoint to {out / 'compressed'}" in proc.stdout
    assert "compressing bitmap layers" in proc.stderr
    manifest = json.loads((out / "compressed" / checkpoint.MANIFEST).read_text())
    assert manifest["format"] == "wanda-kernels-bitmap-compressed" and manifest["dtype"] == "float16"
    assert len(manifest["sparse_layers"]) == 2 * 7
    dense_size = (out / "model.safetensors").stat().st_size  # fp32 on this CPU run
    assert (out / "compressed" / "model.safetensors").stat().st_size < dense_size / 2
    # The compressed copy holds the fp16 rounding of the pruned weights, and eval runs it
    # (F.linear on the decompressed weight, here on the CPU): the dense copy evaluated in
    # fp16 gives the same perplexity, to the last printed digit.
    evals = [_cli("eval", "--model", target, "--text", text_file, "--seqlen", "32", "--eval-tokens", "256", *extra)
             for target, extra in ((out / "compressed", ()), (out, ("--dtype", "fp16")))]
    assert all(p.returncode == 0 for p in evals), [p.stderr[-2000:] for p in evals]
    ppl = [re.search(r"perplexity (\S+) over", p.stdout).group(1) for p in evals]
    assert ppl[0] == ppl[1], ppl
    proc = _cli("eval", "--model", out / "compressed", "--dtype", "bf16")
    _assert_usage_error(proc, r"--dtype bf16: .* is a bitmap compressed checkpoint stored in float16")


def test_prune_with_every_nm_switch_and_its_compressed_checkpoint(model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    proc = _cli("prune", "--model", model_dir, "--text", text_file, "--nsamples", "4", "--seqlen", "32",
                "--pattern", "2:4", "--metric", "ria", "--permute", "--dsnot", "--output", out, "--compressed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / checkpoint.MANIFEST).read_text())["report"]
    assert report["options"] == dict(metric="ria", owl=False, permute=True, dsnot=True)
    assert len(report["folded"]) == 2 * 2  # down_proj and o_proj of both layers
    assert report["permutations"] == sorted(checkpoint.load_permutations(out))
    layers = json.loads((out / "compressed" / checkpoint.MANIFEST).read_text())["sparse_layers"]
    assert len(layers) == 2 * 7 and sum(permuted for *_, permuted in layers.values()) == len(report["permutations"])
    # The compressed copy (gathering its permuted inputs) and the dense copy in fp16 agree;
    # only the order of the fp16 sums differs.
    _compressed_and_dense_agree(out, text_file)


def _tiny_model_folder(tmp_path, config_cls, auto=transformers.AutoModelForCausalLM, **config):
    """A random model of ``config_cls`` (built by ``auto``) with the built-in tokenizer, saved
    as a Hugging Face folder; ``config``'s ``text_config`` gets the tokenizer's vocabulary too."""
    tok = transformers.AutoTokenizer.from_pretrained(_assets_or_skip())
    torch.manual_seed(0)
    folder = tmp_path / f"tiny-{config_cls.__name__}"
    if "text_config" in config:
        config["text_config"] = {**config["text_config"], "vocab_size": len(tok)}
    auto.from_config(config_cls(vocab_size=len(tok), **config)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _compressed_and_dense_agree(out, text_file):
    """``eval`` of ``out/compressed`` and of ``out`` in fp16: the same perplexity but for fp16 sum order."""
    evals = [_cli("eval", "--model", target, "--text", text_file, "--seqlen", "32", "--eval-tokens", "256", *extra)
             for target, extra in ((out / "compressed", ()), (out, ("--dtype", "fp16")))]
    assert all(p.returncode == 0 for p in evals), [p.stderr[-2000:] for p in evals]
    ppl = [float(re.search(r"perplexity (\S+) over", p.stdout).group(1)) for p in evals]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-3), ppl


def _prune_compressed(model_dir, text_file, out, *options):
    proc = _cli("prune", "--model", model_dir, "--text", text_file, "--nsamples", "4", "--seqlen", "32",
                "--pattern", "2:4", *options, "--output", out, "--compressed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads((out / "compressed" / checkpoint.MANIFEST).read_text())["sparse_layers"]


def test_prune_compressed_of_a_gpt2_model(text_file, tmp_path):
    # GPT-2's linear layers are transformers' Conv1D: --compressed must store them, not
    # fail after the pruning (and with it lose the whole --output).
    model_dir = _tiny_model_folder(tmp_path, transformers.GPT2Config, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    _, layers = _prune_compressed(model_dir, text_file, tmp_path / "out")
    assert sorted(layers) == sorted(f"transformer.h.{i}.{n}" for i in range(2)
                                    for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert layers["transformer.h.0.attn.c_attn"][:2] == [64, 192]  # (in, out)
    # The same fp16 weights; Conv1D's addmm and the fallback's F.linear may sum in other orders.
    _compressed_and_dense_agree(tmp_path / "out", text_file)


def test_prune_compressed_of_a_falcon_model(text_file, tmp_path):
    # Falcon's linear layers are FalconLinear, an nn.Linear subclass with its own forward
    # (x @ W.T + b): prune --compressed used to prune them, then fail (losing the output)
    # because the compressed formats took nn.Linear itself only.
    model_dir = _tiny_model_folder(tmp_path, transformers.FalconConfig, hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4)
    _, layers = _prune_compressed(model_dir, text_file, tmp_path / "out", "--permute")
    assert sorted(layers) == sorted(f"transformer.h.{i}.{n}" for i in range(2) for n in (
        "self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"))
    _compressed_and_dense_agree(tmp_path / "out", text_file)


@pytest.mark.parametrize("family", ["mixtral", "llama4"])
def test_prune_compressed_of_a_mixture_of_experts_model(family, text_file, tmp_path):
    # The experts are 3-D weights, not linear layers (Mixtral's routed by index, Llama 4's
    # stacked and stored (experts, in, out)): pruned expert by expert, said so on stdout,
    # and stored dense (as pruned) next to the 2:4 linear layers.
    from safetensors.torch import load_file

    shared = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=4)
    attention = [f"self_attn.{p}_proj" for p in "qkvo"]
    if family == "mixtral":
        skip_before_transformers_5("keeps Mixtral's experts as modules of their own, not 3-D weights")
        model_dir = _tiny_model_folder(tmp_path, transformers.MixtralConfig, num_experts_per_tok=2, **shared)
        linears, experts_in_file = attention, 2 * 4 * 3  # one (out, in) matrix per expert and projection
    else:  # every layer a mixture; its shared expert is linear layers, its router (nn.Linear subclass) stays dense
        model_dir = _tiny_model_folder(tmp_path, transformers.Llama4TextConfig, head_dim=16, intermediate_size_mlp=96,
                                       interleave_moe_layer_step=1, **shared)
        linears = [*(f"feed_forward.shared_expert.{p}_proj" for p in ("gate", "up", "down")), *attention]
        experts_in_file = 2 * 2  # gate_up_proj and down_proj, (experts, in, out) each
    out = tmp_path / "out"
    proc, layers = _prune_compressed(model_dir, text_file, out)
    assert "16 of the pruned layers are experts' projections in fused mixture-of-experts weights (stored dense in " \
           "the compressed checkpoint" in proc.stdout
    assert sorted(layers) == sorted(f"model.layers.{i}.{n}" for i in range(2) for n in linears)
    experts = {k: w for k, w in load_file(out / "model.safetensors").items() if ".experts." in k}
    assert len(experts) == experts_in_file
    for name, w in experts.items():
        w = w.transpose(-1, -2) if family == "llama4" else w  # (..., out, in)
        assert (w.reshape(*w.shape[:-1], -1, 4) != 0).sum(-1).le(2).all(), name  # 2:4 along the inputs
    _compressed_and_dense_agree(out, text_file)


def test_prune_compressed_of_a_vision_language_model_keeps_its_vision_encoder_and_processor(text_file, tmp_path):
    # AutoModelForCausalLM refuses LLaVA's config: the command failed. Now its language
    # model is pruned, and both checkpoints hold the vision encoder (as it was) and the
    # processor, so the output is the whole model, ready for images.
    text = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=28,
                  patch_size=14)
    model_dir = _tiny_model_folder(tmp_path, transformers.LlavaConfig, auto=transformers.AutoModelForImageTextToText,
                                   text_config=text, vision_config=vision, image_token_index=5)
    source = transformers.AutoModelForImageTextToText.from_pretrained(model_dir)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 28},
                                                      crop_size={"height": 28, "width": 28})
    transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                                vision_feature_select_strategy="default").save_pretrained(model_dir)
    processor_file = model_dir / "processor_config.json"
    assert processor_file.is_file()
    out = tmp_path / "out"
    proc, layers = _prune_compressed(model_dir, text_file, out)
    assert "pruned 2 decoder layers" in proc.stdout
    assert sorted(layers) == sorted(f"model.language_model.layers.{i}.{p}" for i in range(2) for p in (
        *(f"self_attn.{x}_proj" for x in "qkvo"), *(f"mlp.{x}_proj" for x in ("gate", "up", "down"))))
    for folder in (out, out / "compressed"):
        assert (folder / processor_file.name).read_bytes() == processor_file.read_bytes()
        assert type(transformers.AutoProcessor.from_pretrained(folder)).__name__ == "LlavaProcessor"
    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(out)
    assert type(reloaded) is type(source)
    vision_weights = [n for n, _ in source.named_parameters() if not n.startswith("model.language_model.")]
    assert any(".vision_tower." in n for n in vision_weights)
    for n in vision_weights:
        assert torch.equal(reloaded.get_parameter(n), source.get_parameter(n)), n
    _compressed_and_dense_agree(out, text_file)


def test_prune_with_owl(model_dir, text_file, tmp_path):
    proc = _cli("prune", "--model", model_dir, "--text", text_file, "--nsamples", "4", "--seqlen", "32",
                "--sparsity", "0.6", "--owl", "--owl-lambda", "0.05", "--output", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / checkpoint.MANIFEST).read_text())["report"]
    assert report["options"]["owl"] and report["options"]["owl_lambda"] == 0.05
    targets = report["layer_targets"]
    assert len(targets) == 2 and sum(targets) / 2 == pytest.approx(0.6) and max(targets) - min(targets) == \
        pytest.approx(0.1)


@pytest.mark.parametrize(("raised", "status", "message"), [
    (KeyboardInterrupt(), 130, r"^wanda-kernels prune: interrupted; no output was left half-written$"),
    (OSError(28, "No space left on device"), 1, r"^wanda-kernels prune: error: \[Errno 28\] No space left on device "
                                                r"\(run with -v for the traceback\)$"),
])
def test_a_failed_save_leaves_nothing(model_dir, text_file, tmp_path, monkeypatch, capsys, raised, status, message):
    def save_then_fail(model, tokenizer, out_dir, **kwargs):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "model.safetensors").write_bytes(b"half")
        raise raised

    monkeypatch.setattr(checkpoint, "save_compressed", save_then_fail)
    out = tmp_path / "out"
    status_got = cli.main(["prune", "--model", str(model_dir), "--text", str(text_file), "--pattern", "2:4",
                           "--nsamples", "2", "--seqlen", "32", "--output", str(out), "--compressed"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status_got == status and re.search(message, err[-1]), err
    assert list(tmp_path.iterdir()) == []  # neither the output nor its staging folder


# ---------------------------------------------------------------------------
# Parser and README agree


def test_eval_takes_only_the_options_it_uses():
    proc = _cli("eval", "--help")
    assert proc.returncode == 0
    for used in ("--model", "--text", "--seqlen", "--eval-tokens", "--device", "--dtype"):
        assert used in proc.stdout
    for unused in ("--nsamples", "--seed", "--sparsity", "--output"):
        assert unused not in proc.stdout


def _synopsis() -> dict[str, list[str]]:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- cli-synopsis -->")[1].split("<!-- /cli-synopsis -->")[0]
    commands: dict[str, list[str]] = {}
    current = None
    for line in block.splitlines():
        if line.startswith("wanda-kernels "):
            current = line.split()[1]
            commands[current] = []
        if current and not line.startswith("```"):
            commands[current].append(line)
    return {c: " ".join(lines) for c, lines in commands.items()}


def test_readme_synopsis_matches_the_parser():
    subparsers = next(a for a in cli.build_parser()._actions if a.dest == "command").choices
    synopsis = _synopsis()
    assert set(synopsis) == set(subparsers)
    for command, line in synopsis.items():
        shown = dict(re.findall(r"(--[a-z-]+)(?: ([^\]\s]+))?", line.split(command, 1)[1]))
        actions = {a.option_strings[-1]: a for a in subparsers[command]._actions if a.option_strings[-1] != "--help"}
        assert set(shown) == set(actions), (command, set(shown) ^ set(actions))
        for option, value in shown.items():
            action = actions[option]
            if "|" in value:  # the choices, the default first
                alternatives = value.split("|")
                assert alternatives == list(action.choices) if action.choices else alternatives[0] == action.default
            elif value.isupper():  # a placeholder: DIR, FILE, OUT
                assert action.default is None, (command, option)
            elif value:  # the default, or where the parser's is None, the one its help names
                assert value == str(action.default) or (action.default is None and f"default {value}" in action.help), \
                    (command, option, value, action.default)
            else:  # a flag
                assert action.nargs == 0, (command, option)
        required = {a.option_strings[-1] for a in actions.values() if a.required}
        assert all(f"[{o}" not in line for o in required) and all(o in line for o in required)


def test_prune_help_explains_options():
    proc = _cli("prune", "--help")
    assert proc.returncode == 0
    for option in ("--model", "--sparsity", "--pattern", "--method", "--nsamples", "--seqlen", "--output",
                   "--overwrite"):
        assert option in proc.stdout


# ---------------------------------------------------------------------------
# The built-in model, end to end


def test_prune_eval_demo_smoke(tmp_path):
    _assets_or_skip()
    out = tmp_path / "pruned"
    proc = _cli("prune", "--pattern", "2:4", "--nsamples", "2", "--seqlen", "32", "--output", out,
                "--compressed", "--eval", "--eval-tokens", "64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mean sparsity 0.5000" in proc.stdout and "perplexity:" in proc.stdout
    for target in (out, out / "compressed"):
        proc = _cli("eval", "--model", target, "--seqlen", "32", "--eval-tokens", "64")
        assert proc.returncode == 0 and "perplexity" in proc.stdout, proc.stderr[-3000:]
    proc = _cli("demo", "--nsamples", "2", "--seqlen", "32", "--eval-tokens", "64", "--output-dir", tmp_path / "d")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("demo: SmolLM2-135M-Instruct (LlamaForCausalLM, 135M parameters)")
    result = json.loads((tmp_path / "d" / "demo.json").read_text())
    assert result["model"] == "SmolLM2-135M-Instruct"
    assert [r["run"] for r in result["results"]] == ["dense", "magnitude 50%", "wanda 50%", "magnitude 2:4",
                                                     "wanda 2:4", "wanda+RIA+perm+DSnoT 2:4"]
    assert (tmp_path / "d" / "demo.png").stat().st_size > 0


def test_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "wanda-kernels")
    if not os.path.exists(script):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("pip install did not create the wanda-kernels console script")
        pytest.skip("package not installed in this environment")
    proc = subprocess.run([script, "demo", "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "--nsamples" in proc.stdout and "Austen" in proc.stdout
