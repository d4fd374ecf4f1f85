"""The benchmark scripts run (CPU smoke mode) and refuse cleanly without a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script, *args, tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(BENCH / script), *args, "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("script", ["gemm_2to4.py", "e2e_decode.py"])
def test_gpu_benchmarks_refuse_without_cuda(script, tmp_path):
    if os.path.exists("/dev/nvidiactl"):
        pytest.skip("a GPU machine")
    proc = _run(script, tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())


def test_gemm_2to4_smoke(tmp_path):
    proc = _run("gemm_2to4.py", "--allow-cpu", "--tokens", "1", "16", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("gemm_2to4_*.json")
    data = json.loads(result.read_text())
    assert data["environment"]["torch"] and "device_name" in data["environment"]
    rows = data["results"]
    assert {r["tokens"] for r in rows} == {1, 16} and {r["dtype"] for r in rows} == {"float16", "bfloat16"}
    for r in rows:
        assert r["dense_ms"] > 0 and r["ours_ms"] > 0 and r["speedup_ours"] == pytest.approx(r["dense_ms"] / r["ours_ms"])
        # Kernel-alone columns exist in every row, empty where that kernel cannot run (here: no GPU).
        assert {"sm80_ms", "sm90_decode_ms", "sm90_large_ms", "sm90_streamk_ms", "sm90_wide_ms", "torch_ms"} <= set(r)
        assert r["timing"] == "triton do_bench median" and r["weight_copies"] == 1
        assert r["sm80_ms"] is None and r["sm90_ms"] is None
        assert r["dense_gbps"] > 0 and r["ours_gbps"] > 0
        # The bitmap column: 50% unstructured at the same shape, timed after its output was checked.
        assert r["bitmap_ms"] > 0 and r["speedup_bitmap"] == pytest.approx(r["dense_ms"] / r["bitmap_ms"])
        assert r["max_abs_err"]["bitmap"] < 1e-2 and r["bitmap_kernel"].startswith("dense fallback")
    assert data["environment"]["copy_gbps"] > 0 and data["environment"]["kernels_timed"] == []
    assert result.with_suffix(".csv").exists()
    if __import__("importlib").util.find_spec("matplotlib"):
        assert result.with_suffix(".png").stat().st_size > 0


def test_e2e_decode_smoke(tmp_path):
    proc = _run("e2e_decode.py", "--allow-cpu", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("e2e_decode_*.json")
    rows = json.loads(result.read_text())["results"]
    assert [(r["format"], r["batch"]) for r in rows] == [("2:4", 1), ("2:4", 16), ("bitmap", 1), ("bitmap", 16)]
    assert {r["mode"] for r in rows} == {"eager"}  # graphs need CUDA
    # 16-bit weights: half of them plus metadata (2:4: 2 bits per weight; bitmap: 1 bit)
    assert all(r["weight_bytes_ratio"] == pytest.approx(0.5625) for r in rows)
    assert all(r["dense_tok_s"] > 0 and r["sparse_tok_s"] > 0 for r in rows)
    # Dense and sparse decode the same cache and input: their outputs are compared.
    assert all(r["outputs_match"] and r["rel_diff_vs_dense"] < 5e-2 for r in rows)


def test_prune_speed_smoke(tmp_path):
    proc = _run("prune_speed.py", "--models", "7B", "--cpu-rows", "8", "--patterns", "unstructured", "2:4",
                "--ops", "mask", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("prune_speed_*.json")
    rows = json.loads(result.read_text())["results"]
    assert len(rows) == 3 * 2
    for r in rows:
        assert r["ours_ms"] > 0 and r["baseline_ms"] > 0 and r["ours_gbps"] > 0


def test_prune_speed_norms_and_fused_compress_smoke(tmp_path):
    proc = _run("prune_speed.py", "--models", "7B", "--cpu-rows", "32", "--ops", "norms", "compress",
                tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("prune_speed_*.json")
    rows = json.loads(result.read_text())["results"]
    assert [r["pattern"] for r in rows] == ["act-norms", "prune+compress 2:4"] * 3
    for r in rows:
        assert r["ours_ms"] > 0 and r["baseline_ms"] > 0 and r["speedup"] == pytest.approx(r["baseline_ms"] / r["ours_ms"])


@pytest.mark.parametrize("script", ["memcheck_sparse24.py", "profile_targets.py"])
def test_gpu_tools_refuse_without_cuda(script):
    if os.path.exists("/dev/nvidiactl"):
        pytest.skip("a GPU machine")
    tool = BENCH.parent / "tools" / script
    proc = subprocess.run([sys.executable, str(tool)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args", [(), ("--schedules",)])
def test_tune_sm90_refuses_without_a_hopper_gpu(args, tmp_path):
    if os.path.exists("/dev/nvidiactl"):
        pytest.skip("a GPU machine")
    proc = _run("tune_sm90.py", *args, tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "needs a compute capability 9.0 GPU" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())


def test_gemm_table_renders_the_committed_h100_result():
    # The README's GEMM tables are this script's output on a committed result: each cell
    # is that result's SparseLinear / cuBLAS ratio, the bracket PyTorch's, and the
    # configuration the dispatch rule names for the shape.
    path = next((BENCH / "results/h100/round4").glob("gemm_2to4_*.json"))
    proc = subprocess.run([sys.executable, str(BENCH / "gemm_table.py"), str(path)], capture_output=True, text=True,
                          timeout=120, check=True)
    rows = json.loads(path.read_text())["results"]
    cell = next(r for r in rows if (r["model"], r["layer"], r["tokens"], r["dtype"]) == ("70B", "down", 1, "float16"))
    line = next(line for line in proc.stdout.splitlines() if line.startswith("| 70B down (8192×28672)"))
    assert line.split(" | ")[1] == f"**{cell['speedup_ours']:.2f}×** ({cell['speedup_torch']:.2f}×) decode"
    assert proc.stdout.count("| layer (out × in) |") == 2  # one table per dtype
    readme = (BENCH.parent / "README.md").read_text()
    assert line in readme, "README's GEMM table differs from the committed result"


def test_gemm_table_sets_the_bitmap_speedups_against_their_targets(tmp_path):
    # A hand-made result (no GPU here): each bitmap cell is the speedup and its target for
    # that token count (1.5x at 1, 1.3x from 16, 1.0x from 128, 0.9x from 2048), met or missed.
    def row(tokens, speedup, layer="q", shape=(4096, 4096)):
        return {"model": "7B", "layer": layer, "out_features": shape[0], "in_features": shape[1], "tokens": tokens,
                "dtype": "float16", "speedup_ours": None, "speedup_bitmap": speedup}

    rows = [row(1, 1.62), row(16, 1.2), row(8192, 0.95), row(1, 1.49, "down", (4096, 11008))]
    path = tmp_path / "gemm_2to4_fake.json"
    path.write_text(json.dumps({"environment": {}, "results": rows}))
    proc = subprocess.run([sys.executable, str(BENCH / "gemm_table.py"), str(path)], capture_output=True, text=True,
                          timeout=120, check=True)
    lines = proc.stdout.splitlines()
    assert "| bitmap layer (out × in) | 1 tok | 16 tok | 8192 tok |" in lines
    assert ("| 7B q (4096×4096) | **1.62×** (≥ 1.5×: met) | **1.20×** (≥ 1.3×: missed) | **0.95×** (≥ 0.9×: met) |"
            in lines)
    assert "| 7B down (4096×11008) | **1.49×** (≥ 1.5×: missed) | – | – |" in lines
    assert "float16: 2 targets met, 2 missed" in lines
    sys.path.insert(0, str(BENCH))
    try:
        from gemm_table import bitmap_target
    finally:
        sys.path.remove(str(BENCH))
    assert [bitmap_target(t) for t in (1, 15, 16, 127, 128, 2047, 2048, 8192)] == [1.5, 1.5, 1.3, 1.3, 1.0, 1.0, 0.9,
                                                                                   0.9]


def test_results_never_overwrite_an_earlier_run(tmp_path):
    # Committed results (the README cites them by name) and earlier runs stay as they are:
    # each run gets a new file named by device and date.
    sys.path.insert(0, str(BENCH))
    try:
        from _common import write_results
    finally:
        sys.path.remove(str(BENCH))
    env = {"device_type": "cpu", "device_name": "AMD EPYC", "timestamp_utc": "2026-11-23T10:00:00Z"}
    committed = tmp_path / "ppl_table_amd-epyc.json"
    committed.write_text("committed")
    first = write_results("ppl_table", env, [{"a": 1}], tmp_path)
    first.with_suffix(".md").write_text("table")
    second = write_results("ppl_table", env, [{"a": 2}], tmp_path)
    assert first.name == "ppl_table_amd-epyc_2026-11-23.json" and second.name == "ppl_table_amd-epyc_2026-11-23-2.json"
    assert committed.read_text() == "committed" and json.loads(first.read_text())["results"] == [{"a": 1}]
    assert json.loads(second.read_text())["results"] == [{"a": 2}]


def test_prune_distributed_smoke(tmp_path):
    from test_pipeline import _assets_or_skip

    _assets_or_skip()
    proc = _run("prune_distributed.py", "--layers", "2", "--nsamples", "3", "--seqlen", "16", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pruned weights bit-identical across world sizes [1, 2]" in proc.stdout
    (result,) = tmp_path.glob("prune_distributed_*.json")
    data = json.loads(result.read_text())
    assert data["environment"]["backend"] == "gloo" and data["environment"]["model"] == "SmolLM2-135M-Instruct"
    one, two = data["results"]
    assert (one["world_size"], two["world_size"]) == (1, 2) and one["layers"] == two["layers"] == 2
    assert one["calib_tokens_per_rank"] == [48] and two["calib_tokens_per_rank"] == [16, 32]
    assert one["weights_sha256"] == two["weights_sha256"] and len(two["per_rank"]) == 2
    assert two["speedup_vs_first"] == pytest.approx(two["tokens_per_s"] / one["tokens_per_s"])
    assert all(r["tokens_per_s"] == pytest.approx(48 / r["seconds"]) for r in (one, two))


def test_bitmap_checkpoint_smoke(tmp_path):
    from test_pipeline import _assets_or_skip

    _assets_or_skip()
    proc = _run("bitmap_checkpoint.py", "--patterns", "50%", "--nsamples", "2", "--seqlen", "32", "--eval-tokens",
                "128", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("bitmap_checkpoint_*.json")
    (row,) = json.loads(result.read_text())["results"]
    # Wanda keeps the same count in every row of all 210 layers: values + 1 bit per weight, no offsets.
    assert row["pattern"] == "50%" and row["sparse_layers"] == 210 and row["layers_with_row_offsets"] == 0 and row["bitmap_load_seconds"] > 0
    assert row["sparse_layers_ratio"] == 0.5625 and row["model_ratio"] < 0.66
    assert row["bitmap_file_bytes"] < row["dense_file_bytes"] / 3  # fp32 dense file on the CPU
    # On the CPU BitmapLinear runs F.linear on the decompressed fp16 weights: the same perplexity.
    assert row["bitmap_perplexity"] == row["dense_perplexity"] and row["bitmap_kernel"].startswith("dense fallback")


def test_ppl_table_smoke(tmp_path):
    from test_pipeline import _assets_or_skip

    _assets_or_skip()
    proc = _run("ppl_table.py", "--patterns", "50%", "--variants", "wanda", "wanda +OWL", "wanda +RIA", "--nsamples",
                "2", "--seqlen", "32", "--eval-tokens", "128", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("ppl_table_*.json")
    rows = {r["method"]: r for r in json.loads(result.read_text())["results"]}
    assert set(rows) == {"dense", "wanda", "wanda +OWL", "wanda +RIA"}
    owl = rows["wanda +OWL"]
    assert owl["options"]["owl"] and len(owl["layer_targets"]) == 30
    assert owl["sparsity"] == pytest.approx(0.5, abs=1e-3)  # OWL's mean is the target (each row floors)
    assert rows["wanda +RIA"]["options"]["metric"] == "ria"
    assert owl["time_vs_base"] == pytest.approx(owl["prune_seconds"] / rows["wanda"]["prune_seconds"])
    md = result.with_suffix(".md").read_text()
    assert "| wanda +OWL | " in md and "x) |" in md
    assert result.with_suffix(".png").stat().st_size > 10_000
