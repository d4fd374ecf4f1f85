// Run-time choice among the sm90a instances of sparse24_sm90.cu. Compiled by the host
// compiler; WK_HAS_SM90 says whether the build holds the instances (architectures
// including 90). Without them every entry point reports kErrorArchMismatch.
#include "cutlass/cutlass.h"
#include "sparse24_sm90.h"
#include "sparse24_sm90_instances.h"

namespace wanda_kernels {

bool sm90_built() { return WK_HAS_SM90 != 0; }

void sm90_config_shape(Sm90Config config, int* tile_m, int* tile_n, int* tile_k) {
  switch (config) {
    case Sm90Config::kDecode: *tile_m = 64, *tile_n = 32, *tile_k = 256; return;
    case Sm90Config::kLarge: *tile_m = 128, *tile_n = 128, *tile_k = 128; return;
    case Sm90Config::kStreamK: *tile_m = 128, *tile_n = 32, *tile_k = 256; return;
    case Sm90Config::kWide: *tile_m = 128, *tile_n = 256, *tile_k = 128; return;
  }
  *tile_m = *tile_n = *tile_k = 0;
}

#if WK_HAS_SM90
#define WK_SM90_SWITCH(fn, ...)                                                   \
  switch (static_cast<int>(dtype) * kSm90NumConfigs + static_cast<int>(config)) { \
    case 0: return sm90_d0_c0_##fn(__VA_ARGS__);                                  \
    case 1: return sm90_d0_c1_##fn(__VA_ARGS__);                                  \
    case 2: return sm90_d0_c2_##fn(__VA_ARGS__);                                  \
    case 3: return sm90_d0_c3_##fn(__VA_ARGS__);                                  \
    case 4: return sm90_d1_c0_##fn(__VA_ARGS__);                                  \
    case 5: return sm90_d1_c1_##fn(__VA_ARGS__);                                  \
    case 6: return sm90_d1_c2_##fn(__VA_ARGS__);                                  \
    case 7: return sm90_d1_c3_##fn(__VA_ARGS__);                                  \
    default: break;                                                               \
  }
#else
#define WK_SM90_SWITCH(fn, ...)
#endif

std::size_t sm90_workspace_size(DType dtype, Sm90Config config, Sparse24Sm90Problem const& p) {
  WK_SM90_SWITCH(workspace_size, p)
  return 0;
}

int sm90_can_implement(DType dtype, Sm90Config config, Sparse24Sm90Problem const& p) {
  WK_SM90_SWITCH(can_implement, p)
  return static_cast<int>(cutlass::Status::kErrorArchMismatch);
}

int sm90_gemm(DType dtype, Sm90Config config, Sparse24Sm90Problem const& p, void* stream) {
  WK_SM90_SWITCH(run, p, stream)
  return static_cast<int>(cutlass::Status::kErrorArchMismatch);
}

std::size_t sm90_compress_workspace_size(DType dtype, int m, int k, int sm_count) {
#if WK_HAS_SM90
  if (dtype == DType::kFloat16) return sm90_d0_c0_compress_workspace_size(m, k, sm_count);
  if (dtype == DType::kBFloat16) return sm90_d1_c0_compress_workspace_size(m, k, sm_count);
#endif
  return 0;
}

int sm90_compress(DType dtype, int m, int k, std::uintptr_t dense, std::uintptr_t values, std::uintptr_t meta,
                  std::uintptr_t workspace, int sm_count, void* stream) {
#if WK_HAS_SM90
  if (dtype == DType::kFloat16) return sm90_d0_c0_compress(m, k, dense, values, meta, workspace, sm_count, stream);
  if (dtype == DType::kBFloat16) return sm90_d1_c0_compress(m, k, dense, values, meta, workspace, sm_count, stream);
#endif
  return static_cast<int>(cutlass::Status::kErrorArchMismatch);
}

}  // namespace wanda_kernels
