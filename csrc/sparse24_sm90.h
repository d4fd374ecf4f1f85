// 2:4 sparse GEMM on Hopper's sparse wgmma (CUTLASS 3.x sm90a kernels), host interface.
//
//   y (N x M, row-major, row stride ldy) = x (N x K, row-major, ldx) @ W^T + bias
//
// W (M = out_features x K = in_features) is 2:4 sparse: values (M x K/2, row-major,
// the same tensor as for the sm80 kernel) plus metadata E in the sm90 layout of
// CUTLASS's Sm90GemmSparseConfig::fill_layoutE (M padded to 64, K to 128; see
// wanda_kernels/_layout24.py). In CUTLASS's terms A = W (K-major), B = x^T (K-major)
// and D = y^T (column-major M x N), so y comes out row-major with no transpose pass,
// and the bias is added per row of D (per output feature) in the epilogue. fp32
// accumulate. N (tokens) is free: TMA handles the ragged tile.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common.h"

namespace wanda_kernels {

// Tile configurations (Python: wanda_kernels._C.Sm90Config); their shapes are in
// sm90_tile_shape below, their clusters and schedules in sparse24_sm90.cu (Sm90Tile):
//   kDecode : one consumer warp group, no cluster; few tokens
//   kLarge  : cooperative (two consumer warp groups), cluster 1x2x1
//   kStreamK: cooperative, stream-K decomposition; few tokens on weights with too few
//             output tiles to fill the GPU
//   kWide   : cooperative, cluster 2x1x1; many tokens
enum class Sm90Config : int { kDecode = 0, kLarge = 1, kStreamK = 2, kWide = 3 };

struct Sm90TileShape {
  int m, n, k;
};

// The one table of tile shapes: the kernels are built from it (sparse24_sm90.cu) and
// Python reads it through _C.sm90_config_shape. Every tile K is >= 128, so that one
// metadata layout serves all configurations.
constexpr Sm90TileShape sm90_tile_shape(Sm90Config config) {
  switch (config) {
    case Sm90Config::kDecode: return {64, 32, 256};    // a 4096-row weight gives 64 tiles; long TMA bursts
    case Sm90Config::kLarge: return {128, 128, 128};   // CUTLASS example 62's tile
    case Sm90Config::kStreamK: return {128, 32, 256};
    case Sm90Config::kWide: return {128, 256, 128};    // halves the W re-reads of kLarge
  }
  return {0, 0, 0};
}

// The order in which the persistent schedulers (kLarge, kWide, kStreamK) hand output
// tiles to CTAs: CUTLASS's RasterOrderOptions, in its order. kDecode launches one CTA
// per tile and ignores it.
enum class Sm90Raster : int { kHeuristic = 0, kAlongM = 1, kAlongN = 2 };

// How a persistent kernel walks its tiles. `swizzle` (1, 2, 4 or 8) groups that many
// neighbouring tiles along the raster, so that CTAs running at the same time share x
// and W tiles in L2. `splits` > 1 (kStreamK only) replaces the stream-K decomposition
// by a split-K of that many K slices, reduced in the workspace. The defaults are
// CUTLASS's.
struct Sm90Schedule {
  int swizzle = 1;
  Sm90Raster raster = Sm90Raster::kHeuristic;
  int splits = 1;
};

struct Sm90Problem {
  int m, n, k;              // out_features (M % 8 == 0), tokens, in_features (K % 64 == 0)
  std::uintptr_t values;    // M x K/2 elements, row-major
  std::uintptr_t meta;      // sm90 metadata bytes (round_up(M, 64) * round_up(K, 128) / 8)
  std::uintptr_t x;         // N x K, row stride ldx
  std::int64_t ldx;
  std::uintptr_t y;         // N x M, row stride ldy
  std::int64_t ldy;
  std::uintptr_t bias;      // M elements, or 0 for none
  std::uintptr_t workspace; // sm90_workspace_size bytes (0 when that is 0)
  int sm_count;             // multiprocessors of the device: the persistent and stream-K
                            // schedulers launch at most this many CTAs and loop over tiles
  Sm90Schedule schedule;    // tile order and split of the persistent configurations
};

// One (dtype, configuration) instance of the kernel. The members are defined in
// sparse24_sm90.cu and instantiated explicitly, one translation unit per instance
// (CMakeLists.txt); sparse24_sm90_dispatch.cpp names each instance in its switch.
template <DType D, Sm90Config C>
struct Sm90Kernel {
  static std::size_t workspace_size(Sm90Problem const& p);
  static int can_implement(Sm90Problem const& p);
  static int run(Sm90Problem const& p, void* stream);
};

// CUTLASS's own sm90 compressor, for tests: dense 2:4 (m x k, row-major, m % 64 == 0,
// k % 128 == 0) -> values (m x k/2) and metadata in the sm90 layout. Instantiated in
// the kDecode translation units.
template <DType D>
struct Sm90Compressor {
  static std::size_t workspace_size(int m, int k, int sm_count);
  static int run(int m, int k, std::uintptr_t dense, std::uintptr_t values, std::uintptr_t meta,
                 std::uintptr_t workspace, int sm_count, void* stream);
};

// Whether this build holds the sm90a kernels (built when the architectures include 90
// and nvcc is 12.0 or later).
bool sm90_built();

// Run-time dispatch to the instance of (dtype, config). Without the sm90a kernels the
// size is 0 and the others return kErrorArchMismatch. cutlass::Status as int.
std::size_t sm90_workspace_size(DType dtype, Sm90Config config, Sm90Problem const& p);
int sm90_can_implement(DType dtype, Sm90Config config, Sm90Problem const& p);
int sm90_gemm(DType dtype, Sm90Config config, Sm90Problem const& p, void* stream);
std::size_t sm90_compress_workspace_size(DType dtype, int m, int k, int sm_count);
int sm90_compress(DType dtype, int m, int k, std::uintptr_t dense, std::uintptr_t values, std::uintptr_t meta,
                  std::uintptr_t workspace, int sm_count, void* stream);

}  // namespace wanda_kernels
