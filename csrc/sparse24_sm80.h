// 2:4 sparse GEMM on Ampere's sparse tensor cores (CUTLASS 2.x sm80 SparseGemm, mma.sp),
// host interface. Also runs on compute capability 8.x and 9.0.
//
//   D (M x N, row-major, ldd) = A (M x K, 2:4 sparse, compressed) * B (K x N)
//
// A is a pruned weight W (out_features x in_features): values (M x K/2, row-major)
// plus int16 metadata (M x K/16) in CUTLASS's reordered ColumnMajorInterleaved<2>
// layout (wanda_kernels/_layout24.py). B is x^T for activations x (N tokens x K,
// row-major, row stride ldb), i.e. column-major. fp32 accumulate. The caller
// transposes D into y (N x M) and adds the bias.
#pragma once

#include <cstdint>

#include "common.h"

namespace wanda_kernels {

// Tile configurations (Python: wanda_kernels._C.Sm80Config), chosen by the caller from N:
//   kDecode:  64 x 64 x 64 threadblock, 4 stages; few tokens
//   kLarge : 128 x 128 x 64 threadblock, 3 stages; many tokens
// Both need M % 32 == 0, K % 64 == 0 (threadblock K) and N % 8 == 0 (vector loads
// of B and stores of D): the caller pads tokens to a multiple of 8.
enum class Sm80Config : int { kDecode = 0, kLarge = 1 };

struct Sm80Problem {
  int m, n, k;
  std::uintptr_t values;  // M x K/2 elements
  std::uintptr_t meta;    // M x K/16 int16, reordered
  std::uintptr_t b;       // x: N x K, row stride ldb
  std::int64_t ldb;
  std::uintptr_t d;       // M x N, row stride ldd
  std::int64_t ldd;
};

// CUTLASS's host-side check of the problem (no GPU needed); a cutlass::Status as int.
int sm80_can_implement(DType dtype, Sm80Config config, Sm80Problem const& p);

// Launches the GEMM on `stream` (a cudaStream_t); a cutlass::Status as int.
int sm80_gemm(DType dtype, Sm80Config config, Sm80Problem const& p, void* stream);

// Threadblock shape (M, N, K) and epilogue alignment of a configuration.
void sm80_config_shape(Sm80Config config, int* tb_m, int* tb_n, int* tb_k, int* align_n);

}  // namespace wanda_kernels
