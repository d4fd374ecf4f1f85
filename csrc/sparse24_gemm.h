// 2:4 sparse GEMM on sparse tensor cores (CUTLASS sm80 SparseGemm), host interface.
//
//   D (M x N, row-major, ldd) = A (M x K, 2:4 sparse, compressed) * B (K x N)
//
// A is a pruned weight W (out_features x in_features): values (M x K/2, row-major)
// plus int16 metadata (M x K/16) in CUTLASS's reordered ColumnMajorInterleaved<2>
// layout (see wanda_kernels.reference.compress_24). B is x^T for activations
// x (N tokens x K, row-major, row stride ldb), i.e. column-major. fp32 accumulate.
// The caller transposes D into y (N x M) and adds the bias.
#pragma once

#include <cstdint>

namespace wanda_kernels {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

// Tile configurations, chosen by the caller from N (tokens):
//   kDecode:  64 x 64 x 64 threadblock, 4 stages; few tokens
//   kLarge : 128 x 128 x 64 threadblock, 3 stages; many tokens
// Both need M % 32 == 0, K % 64 == 0 (threadblock K) and N % 8 == 0 (vector loads
// of B and stores of D): the caller pads tokens to a multiple of 8.
enum class Config : int { kDecode = 0, kLarge = 1 };

struct Sparse24Problem {
  int m, n, k;
  std::uintptr_t values;  // M x K/2 elements
  std::uintptr_t meta;    // M x K/16 int16, reordered
  std::uintptr_t b;       // x: N x K, row stride ldb
  std::int64_t ldb;
  std::uintptr_t d;       // M x N, row stride ldd
  std::int64_t ldd;
};

// Checks that CUTLASS accepts the problem (host-only, no GPU needed). Returns a
// cutlass::Status as int (0 = success).
int sparse24_can_implement(DType dtype, Config config, Sparse24Problem const& p);

// Launches the GEMM on `stream` (a cudaStream_t). Returns a cutlass::Status as int.
int sparse24_gemm(DType dtype, Config config, Sparse24Problem const& p, void* stream);

// cutlass::Status as text.
char const* status_string(int status);

// Threadblock shape (M, N, K) and epilogue alignment of a configuration.
void config_shape(Config config, int* tb_m, int* tb_n, int* tb_k, int* align_n);

}  // namespace wanda_kernels
