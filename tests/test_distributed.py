"""prune_model over torch.distributed: gloo on 2-3 CPU processes, against one process.

Every multi-process test starts real processes (``spawn``) that join a gloo group, so
the collectives are torch's own. The bar is bit-identity: the pruned weights of every
rank equal those of a one-process run, for any number of ranks, because the statistics
are summed in one order whatever the split (wanda_kernels/llm/distributed.py). Each
rank runs one CPU thread, and so does the one-process run it is compared with: a CPU
matmul's rounding depends on its thread count (measured here: SparseGPT's weights
differ between 1 and 2 threads in one process), as a GPU kernel's may on another GPU.
"""

import contextlib
import json
import multiprocessing as mp
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

import _dist_worker  # noqa: E402
from test_cli import _cli, model_dir, text_file  # noqa: E402, F401  (fixtures: a tiny LLaMA folder and a text)
from test_pipeline import _assets_or_skip, skip_before_transformers_5  # noqa: E402

from wanda_kernels import ActNormCollector  # noqa: E402
from wanda_kernels.llm import distributed  # noqa: E402
from wanda_kernels.llm.distributed import Shard, shard_bounds  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

CONFIGS = [("wanda", "unstructured"), ("wanda", "2:4"), ("magnitude", "unstructured"), ("sparsegpt", "unstructured"),
           ("sparsegpt", "2:4")]


def _launch(tmp_path, world: int, job: dict, timeout_s: float = 60.0, deadline_s: float = 300.0):
    """Run ``job`` on ``world`` gloo ranks; ``(records by rank, exit codes)``. Fails on a hang."""
    out = tmp_path / f"out-{world}-{job['kind']}"
    out.mkdir()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_dist_worker.run_rank,
                         args=(r, world, str(out / "rendezvous"), str(out), job, timeout_s)) for r in range(world)]
    for p in procs:
        p.start()
    end = time.monotonic() + deadline_s
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} still running after {deadline_s} s: a hang"
    records = [torch.load(out / f"rank{r}.pt", weights_only=False) if (out / f"rank{r}.pt").exists() else None
               for r in range(world)]
    return records, [p.exitcode for p in procs]


@contextlib.contextmanager
def _one_thread():
    """One torch thread, as each rank has (see the module's docstring)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _calib(tmp_path, n=7, seqlen=16, vocab=128, seed=0):
    calib = torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    path = tmp_path / f"calib-{n}-{seqlen}-{vocab}.pt"
    torch.save(calib, path)
    return calib, str(path)


def _assert_equal_results(records, single, world, nsamples, seqlen):
    bounds = [shard_bounds(nsamples, world, r) for r in range(world)]
    for rank, record in enumerate(records):
        assert record is not None and record["error"] is None, (rank, record and record["error"])
        assert record["results"].keys() == single.keys()
        for config, (weights, report) in record["results"].items():
            expected, one_report = single[config]
            assert weights.keys() == expected.keys()
            for name in expected:
                assert torch.equal(weights[name], expected[name]), (rank, config, name)
            assert report["world_size"] == world and one_report["world_size"] == 1
            assert report["calib_tokens_per_rank"] == [(b - a) * seqlen for a, b in bounds]
            assert one_report["calib_tokens_per_rank"] == [nsamples * seqlen]
            assert [layer["sparsity"] for layer in report["layers"]] == \
                   [layer["sparsity"] for layer in one_report["layers"]]


# -- one process: the shard arithmetic and the collectives' single-process behaviour -------------


def test_shard_bounds_are_contiguous_and_even():
    assert [shard_bounds(7, 3, r) for r in range(3)] == [(0, 2), (2, 4), (4, 7)]
    assert [shard_bounds(8, 2, r) for r in range(2)] == [(0, 4), (4, 8)]
    for n in range(3, 40):
        for world in (1, 2, 3, 8):
            if n < world:
                continue
            bounds = [shard_bounds(n, world, r) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_without_a_group_the_shard_is_everything_and_collectives_do_nothing():
    shard = distributed.current_shard(5)
    assert (shard.rank, shard.world_size, shard.start, shard.stop, shard.distributed) == (0, 1, 0, 5, False)
    assert shard.is_main and shard.samples_per_rank() == [5] and distributed.is_main_process()
    rows = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.5, 0.25]])
    assert torch.equal(shard.sum_rows(rows), torch.tensor([4.5, 6.25]))  # hand-computed
    h = torch.ones(2, 2, dtype=torch.float64)
    assert shard.sum_fp64(h) is h and torch.equal(h, torch.ones(2, 2, dtype=torch.float64))
    w = torch.arange(4.0)
    shard.broadcast_([w], [0])
    shard.check_same("x", [1, 2])
    assert torch.equal(w, torch.arange(4.0))
    with pytest.raises(KeyError), distributed.step("a step"):
        raise KeyError("the step's own error, unchanged")


def test_per_call_collector_keeps_each_call_and_sums_in_fp64():
    lin = torch.nn.Linear(3, 2)
    xs = [torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[3.0, 0.0, 1.0], [1.0, 1.0, 1.0]])]
    with ActNormCollector(lin, per_call=True, backend="torch") as col:
        for x in xs:
            lin(x)
    rows = col.call_sq_norms()[""]
    assert torch.equal(rows, torch.tensor([[1.0, 4.0, 0.0], [10.0, 1.0, 2.0]]))  # hand-computed per call
    assert torch.equal(col.sq_norms()[""], torch.tensor([11.0, 5.0, 2.0]))
    assert torch.equal(col.norms()[""], torch.tensor([11.0, 5.0, 2.0]).sqrt())
    with ActNormCollector(lin, backend="torch") as plain:
        lin(xs[0])
    with pytest.raises(RuntimeError, match="per_call=True"):
        plain.call_sq_norms()


def test_shard_keeps_its_fields():
    shard = Shard(rank=1, world_size=3, start=2, stop=4, nsamples=7)
    assert not shard.is_main and shard.samples_per_rank() == [2, 2, 3]
    # LLaMA-7B's linears (q, k, v, o: 4096 x 4096; gate, up, down: 11008 x 4096), largest first to the least
    # loaded rank: gate 0, up 1, down 2, then q 0 (45.1M + 16.8M), k 1, v 2, o 0.
    sizes = [4096 * 4096] * 4 + [11008 * 4096] * 3
    assert shard.owners(sizes) == [0, 1, 2, 0, 0, 1, 2]
    # Two ranks: gate 0, up 1, down 0 (90.2M vs 45.1M), q 1, k 1, v 1 (95.4M), o 0: loads 107.0M and 95.4M.
    assert Shard(world_size=2).owners(sizes) == [1, 1, 1, 0, 0, 1, 0]
    assert Shard().owners(sizes) == [0] * 7


# -- real process groups --------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_prune_bit_identically_to_one_process(tmp_path, world):
    calib, path = _calib(tmp_path)  # 7 samples: unequal shares for 2 and 3 ranks
    with _one_thread():
        single = _dist_worker.prune_configs("tiny", calib, CONFIGS)
        # The comparison can fail: one sample fewer gives other Wanda and SparseGPT weights.
        fewer = _dist_worker.prune_configs("tiny", calib[:-1], [("wanda", "unstructured"), ("sparsegpt", "2:4")])
    for config, (weights, _) in fewer.items():
        assert any(not torch.equal(w, single[config][0][n]) for n, w in weights.items()), config
    for config, (weights, _) in single.items():
        assert all((w == 0).float().mean() >= 0.5 for w in weights.values()), config
    records, codes = _launch(tmp_path, world, {"kind": "equal", "model": "tiny", "calib": path, "configs": CONFIGS})
    assert codes == [0] * world
    _assert_equal_results(records, single, world, *calib.shape)


def test_fused_experts_prune_bit_identically_on_two_ranks(tmp_path):
    # A Mixtral-style model: each rank runs its samples' tokens through the per-expert
    # views; an expert's per-call rows are summed in one order whatever the split.
    skip_before_transformers_5("keeps Mixtral's experts as modules of their own, not 3-D weights")
    configs = [("wanda", "unstructured"), ("sparsegpt", "2:4")]
    calib, path = _calib(tmp_path)
    with _one_thread():
        single = _dist_worker.prune_configs("mixtral", calib, configs)
    for config, (weights, _) in single.items():
        assert sum(".experts." in n for n in weights) == 3 * 8 * 2, config
    records, codes = _launch(tmp_path, 2, {"kind": "equal", "model": "mixtral", "calib": path, "configs": configs})
    assert codes == [0, 0]
    _assert_equal_results(records, single, 2, *calib.shape)


def test_smollm2_first_layers_prune_bit_identically_on_two_ranks(tmp_path):
    _assets_or_skip()
    from wanda_kernels.llm import data, models

    tok = models.load_tokenizer(models.default_model_dir())
    calib = data.sample_windows(tok, data.load_corpus(split="calib"), 5, 64, seed=0)
    path = tmp_path / "calib-smol.pt"
    torch.save(calib, path)
    configs = [("wanda", "unstructured"), ("wanda", "2:4"), ("magnitude", "unstructured"), ("sparsegpt", "2:4")]
    with _one_thread():
        single = _dist_worker.prune_configs("smol:2", calib, configs)
    records, codes = _launch(tmp_path, 2, {"kind": "equal", "model": "smol:2", "calib": str(path), "configs": configs})
    assert codes == [0, 0]
    _assert_equal_results(records, single, 2, *calib.shape)


@pytest.mark.parametrize(("world", "bad_rank"), [(2, 1), (3, 0)])
def test_a_rank_that_raises_ends_every_rank_with_its_error(tmp_path, world, bad_rank):
    _, path = _calib(tmp_path)
    timeout = 120.0
    t0 = time.monotonic()
    records, codes = _launch(tmp_path, world, {"kind": "raise", "model": "tiny", "calib": path, "bad_rank": bad_rank,
                                               "layer": 1}, timeout_s=timeout)
    assert time.monotonic() - t0 < timeout  # told, not timed out
    message = f"injected failure on rank {bad_rank}"
    for rank, record in enumerate(records):
        kind, text = record["error"]
        if rank == bad_rank:
            assert (kind, text) == ("ValueError", message)
        else:
            assert kind == "RankFailed"
            assert text == f"rank {bad_rank} of {world} failed while calibrating decoder layer 1: ValueError: {message}"
        assert record["seconds"] < timeout


def test_a_rank_that_dies_ends_the_others_within_the_timeout(tmp_path):
    _, path = _calib(tmp_path)
    timeout = 20.0
    records, codes = _launch(tmp_path, 2, {"kind": "die", "model": "tiny", "calib": path, "bad_rank": 1, "layer": 1},
                             timeout_s=timeout, deadline_s=timeout + 120)
    assert codes[1] == 3 and records[1] is None
    assert records[0]["error"] is not None, "rank 0 finished although rank 1 died"
    assert records[0]["seconds"] < timeout + 15


def test_ranks_with_different_calibration_are_refused(tmp_path):
    _, path = _calib(tmp_path)
    records, _ = _launch(tmp_path, 2, {"kind": "mismatch", "model": "tiny", "calib": path, "bad_rank": 1})
    for record in records:
        assert record["error"] == ("ValueError", "calib (the calibration token ids) differs between ranks (rank 0 vs "
                                                 "rank 1); every rank must pass the same one")


def test_fewer_samples_than_ranks_is_refused(tmp_path):
    _, path = _calib(tmp_path, n=2)
    records, _ = _launch(tmp_path, 3, {"kind": "equal", "model": "tiny", "calib": path, "configs": CONFIGS[:1]})
    for record in records:
        assert record["error"][0] == "ValueError"
        assert record["error"][1].startswith("nsamples=2 is fewer than the 3 ranks of the process group")


# -- the command under torchrun -------------------------------------------------------------------


TORCHRUN_2 = ("-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone")


def _prune_cli(launcher, model, text, out):
    return _cli("prune", "--model", model, "--text", text, "--nsamples", 5, "--seqlen", 32, "--device", "cpu",
                "--output", out, launcher=launcher, env={"OMP_NUM_THREADS": "1"})  # torchrun's default per rank


def test_cli_under_torchrun_writes_once_what_one_process_writes(tmp_path, model_dir, text_file):  # noqa: F811
    from safetensors.torch import load_file

    one = _prune_cli((), model_dir, text_file, tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _prune_cli(TORCHRUN_2, model_dir, text_file, tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("pruned 2 decoder layers (wanda, unstructured)") == 1  # rank 0 only
    assert "on 2 processes" in two.stdout and "on 2 processes" not in one.stdout
    manifest = json.loads((tmp_path / "two" / "wanda_kernels.json").read_text())
    assert manifest["report"]["world_size"] == 2 and manifest["report"]["calib_tokens_per_rank"] == [64, 96]
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_cli_refuses_a_cuda_index_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="each rank runs on cuda:LOCAL_RANK"):
        distributed.init_from_env(torch.device("cuda", 1), 60)


@pytest.mark.gpu
def test_nccl_two_gpus_prune_bit_identically(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL across ranks needs two CUDA devices")
    calib, path = _calib(tmp_path)
    single = _dist_worker.prune_configs("tiny", calib, CONFIGS, device=torch.device("cuda", 0))
    records, codes = _launch(tmp_path, 2, {"kind": "equal", "model": "tiny", "calib": path, "configs": CONFIGS,
                                           "backend": "nccl"})
    assert codes == [0, 0]
    _assert_equal_results(records, single, 2, *calib.shape)


def test_cli_under_torchrun_a_refusal_on_rank_0_ends_both_ranks(tmp_path, model_dir, text_file):  # noqa: F811
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = _prune_cli(TORCHRUN_2, model_dir, text_file, out)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("wanda-kernels prune")]
    # Only rank 0 checks --output (it alone writes); rank 1 learns of it and stops without a line of its own.
    assert len(ours) == 1 and ours[0].startswith("wanda-kernels prune (rank 0): error: --output"), proc.stderr[-3000:]
    assert "not empty" in ours[0] or "non-empty" in ours[0], ours
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
