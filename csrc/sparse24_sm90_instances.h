// The per-(dtype, configuration) entry points that sparse24_sm90.cu defines, one
// translation unit each; sparse24_sm90_dispatch.cpp switches among them.
#pragma once

#include <cstddef>
#include <cstdint>

#include "sparse24_sm90.h"

#define WK_SM90_CAT_(a, d, c, fn) a##_d##d##_c##c##_##fn
#define WK_SM90_CAT(a, d, c, fn) WK_SM90_CAT_(a, d, c, fn)
// sm90_d<dtype>_c<config>_<fn>, for the dtype and configuration this TU is compiled for.
#define WK_SM90_FN(fn) WK_SM90_CAT(sm90, WK_SM90_DTYPE, WK_SM90_CONFIG, fn)

#define WK_SM90_DECLARE(d, c)                                                       \
  std::size_t sm90_d##d##_c##c##_workspace_size(Sparse24Sm90Problem const& p);     \
  int sm90_d##d##_c##c##_can_implement(Sparse24Sm90Problem const& p);               \
  int sm90_d##d##_c##c##_run(Sparse24Sm90Problem const& p, void* stream);

#define WK_SM90_DECLARE_COMPRESS(d)                                                              \
  std::size_t sm90_d##d##_c0_compress_workspace_size(int m, int k, int sm_count);               \
  int sm90_d##d##_c0_compress(int m, int k, std::uintptr_t dense, std::uintptr_t values,         \
                              std::uintptr_t meta, std::uintptr_t workspace, int sm_count, void* stream);

namespace wanda_kernels {
WK_SM90_DECLARE_COMPRESS(0)
WK_SM90_DECLARE_COMPRESS(1)
WK_SM90_DECLARE(0, 0)
WK_SM90_DECLARE(0, 1)
WK_SM90_DECLARE(0, 2)
WK_SM90_DECLARE(0, 3)
WK_SM90_DECLARE(1, 0)
WK_SM90_DECLARE(1, 1)
WK_SM90_DECLARE(1, 2)
WK_SM90_DECLARE(1, 3)
}  // namespace wanda_kernels
