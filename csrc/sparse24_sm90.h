// 2:4 sparse GEMM on Hopper's sparse wgmma (CUTLASS 3.x sm90a kernels), host interface.
//
//   y (N x M, row-major, row stride ldy) = x (N x K, row-major, ldx) @ W^T + bias
//
// W (M = out_features x K = in_features) is 2:4 sparse: values (M x K/2, row-major,
// the same tensor as for the sm80 kernel) plus metadata E in the sm90 layout of
// CUTLASS's Sm90GemmSparseConfig::fill_layoutE (M padded to 64, K to 128; see
// wanda_kernels.reference.meta_sm90_offsets). In CUTLASS's terms A = W (K-major),
// B = x^T (K-major) and D = y^T (column-major M x N), so y comes out row-major with
// no transpose pass, and the bias is added per row of D (per output feature) in the
// epilogue. fp32 accumulate. N (tokens) is free: TMA handles the ragged tile.
#pragma once

#include <cstddef>
#include <cstdint>

#include "sparse24_gemm.h"  // DType

namespace wanda_kernels {

// Tile configurations (both with tile K >= 128, so that one metadata layout serves all):
//   kSm90Decode : 64 x 32 x 256, one consumer warp group, no cluster; few tokens
//   kSm90Large  : 128 x 128 x 128, cooperative (two consumer warp groups), cluster 1x2x1
//   kSm90Wide   : 128 x 256 x 128, cooperative, cluster 2x1x1; many tokens
//   kSm90StreamK: 128 x 32 x 256, cooperative, stream-K decomposition; few tokens on
//                 weights with too few output tiles to fill the GPU
enum class Sm90Config : int { kDecode = 0, kLarge = 1, kStreamK = 2, kWide = 3 };
constexpr int kSm90NumConfigs = 4;

struct Sparse24Sm90Problem {
  int m, n, k;              // out_features (M % 8 == 0), tokens, in_features (K % 64 == 0)
  std::uintptr_t values;    // M x K/2 elements, row-major
  std::uintptr_t meta;      // sm90 metadata bytes (round_up(M, 64) * round_up(K, 128) / 8)
  std::uintptr_t x;         // N x K, row stride ldx
  std::int64_t ldx;
  std::uintptr_t y;         // N x M, row stride ldy
  std::int64_t ldy;
  std::uintptr_t bias;      // M elements, or 0 for none
  std::uintptr_t workspace; // get_workspace_size bytes (0 when that is 0)
  int sm_count;             // multiprocessors of the device (persistent and stream-K schedulers)
};

// Whether this build holds the sm90a kernels (built when the architectures include 90).
bool sm90_built();

// Bytes of device workspace the kernel needs (0 for the data-parallel configurations).
std::size_t sm90_workspace_size(DType dtype, Sm90Config config, Sparse24Sm90Problem const& p);

// CUTLASS's host-side check of the problem (no GPU needed); cutlass::Status as int.
int sm90_can_implement(DType dtype, Sm90Config config, Sparse24Sm90Problem const& p);

// Launches on `stream` (a cudaStream_t); cutlass::Status as int.
int sm90_gemm(DType dtype, Sm90Config config, Sparse24Sm90Problem const& p, void* stream);

// CUTLASS's own sm90 compressor, for tests: dense 2:4 (m x k, row-major, m % 64 == 0,
// k % 128 == 0) -> values (m x k/2) and metadata in the sm90 layout. cutlass::Status as int.
std::size_t sm90_compress_workspace_size(DType dtype, int m, int k, int sm_count);
int sm90_compress(DType dtype, int m, int k, std::uintptr_t dense, std::uintptr_t values, std::uintptr_t meta,
                  std::uintptr_t workspace, int sm_count, void* stream);

// Tile shape (M, N, K) of a configuration.
void sm90_config_shape(Sm90Config config, int* tile_m, int* tile_n, int* tile_k);

}  // namespace wanda_kernels
