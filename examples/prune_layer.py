"""Prune one LLaMA-7B-sized linear layer with Wanda, and see why activations matter.

    python examples/prune_layer.py            # 4096 x 11008 (LLaMA-7B down_proj)
    python examples/prune_layer.py --quick    # 1024 x 2752, a few seconds

The layer's weights are random, and its inputs are synthetic: Gaussian features of
which 0.5% carry 30x larger values, like the outlier ("massive") activation features
of real LLMs. Calibration norms come from ActNormCollector over a few batches; the
pruned layers are then compared on held-out inputs by their relative output error
||X W^T - X W_pruned^T|| / ||X W^T||. Wanda keeps the weights that outlier features
multiply; magnitude pruning cannot see them.
"""

from __future__ import annotations

import argparse
import time

import torch

import wanda_kernels as wk


def synthetic_activations(tokens, features, outlier_idx, generator, device, dtype):
    x = torch.randn(tokens, features, generator=generator, device=device)
    x[:, outlier_idx] *= 30.0
    return x.to(dtype)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a 1024 x 2752 layer instead of 4096 x 11008")
    p.add_argument("--tokens", type=int, default=512, help="calibration tokens (default 512)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out_f, in_f = (1024, 2752) if args.quick else (4096, 11008)
    g = torch.Generator(device=device).manual_seed(0)
    print(f"layer {out_f} x {in_f} ({'quick' if args.quick else 'LLaMA-7B down_proj'}), {dtype}, on {device}")

    layer = torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_f, in_f, generator=g, device=device) * in_f**-0.5)
    outliers = torch.randperm(in_f, generator=g, device=device)[: max(1, in_f // 200)]

    # 1. Calibrate: accumulate ||X_j||_2 of the layer's inputs.
    with wk.ActNormCollector(layer) as collector:
        for _ in range(4):
            layer(synthetic_activations(args.tokens // 4, in_f, outliers, g, device, dtype))
    norms = collector.norms()[""]  # the module itself has the empty name
    print(f"calibrated on {collector.num_tokens()['']} tokens")

    # 2. Prune copies of the layer four ways and measure the output error on new inputs.
    x_eval = synthetic_activations(256, in_f, outliers, g, device, dtype)
    with torch.no_grad():
        y_dense = layer(x_eval).float()
    print(f"\n{'method':<22}{'pattern':>14}{'sparsity':>10}{'rel. output error':>20}{'prune time':>13}")
    for metric in ("magnitude", "wanda"):
        for pattern in ("unstructured", "2:4"):
            pruned = torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
            pruned.load_state_dict(layer.state_dict())
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            wk.prune_(pruned, norms, pattern=pattern, metric=metric)
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            with torch.no_grad():
                err = (pruned(x_eval).float() - y_dense).norm() / y_dense.norm()
            sparsity = (pruned.weight == 0).float().mean().item()
            print(f"{metric:<22}{pattern:>14}{sparsity:>10.1%}{err.item():>20.4f}{elapsed * 1e3:>10.1f} ms")


if __name__ == "__main__":
    main()
