// Run-time choice among the sm90a instances of sparse24_sm90.cu. Compiled by the host
// compiler; WK_HAS_SM90 says whether the build holds the instances (architectures
// including 90, nvcc 12.0 or later). Without them the workspace size is 0 and every
// other entry point reports kErrorArchMismatch.
#include <cstddef>

#include "cutlass/cutlass.h"
#include "sparse24_sm90.h"

namespace wanda_kernels {
namespace {

constexpr int kArchMismatch = static_cast<int>(cutlass::Status::kErrorArchMismatch);

#if WK_HAS_SM90
// fn(Sm90Kernel<dtype, C>{}): the instance of configuration C for the run-time dtype.
template <Sm90Config C, typename Fn>
auto with_dtype(DType dtype, Fn& fn) {
  return dtype == DType::kFloat16 ? fn(Sm90Kernel<DType::kFloat16, C>{}) : fn(Sm90Kernel<DType::kBFloat16, C>{});
}
#endif

// fn(Sm90Kernel<dtype, config>{}), or `fallback` when the build has no sm90a kernels:
// the one place that names every instance (CMakeLists.txt compiles one unit per case).
template <typename R, typename Fn>
R with_instance(DType dtype, Sm90Config config, R fallback, Fn&& fn) {
#if WK_HAS_SM90
  switch (config) {
    case Sm90Config::kDecode: return with_dtype<Sm90Config::kDecode>(dtype, fn);
    case Sm90Config::kLarge: return with_dtype<Sm90Config::kLarge>(dtype, fn);
    case Sm90Config::kStreamK: return with_dtype<Sm90Config::kStreamK>(dtype, fn);
    case Sm90Config::kWide: return with_dtype<Sm90Config::kWide>(dtype, fn);
  }
#else
  static_cast<void>(dtype), static_cast<void>(config), static_cast<void>(fn);
#endif
  return fallback;
}

}  // namespace

bool sm90_built() { return WK_HAS_SM90 != 0; }

std::size_t sm90_workspace_size(DType dtype, Sm90Config config, Sm90Problem const& p) {
  return with_instance(dtype, config, std::size_t{0},
                       [&](auto kernel) { return decltype(kernel)::workspace_size(p); });
}

int sm90_can_implement(DType dtype, Sm90Config config, Sm90Problem const& p) {
  return with_instance(dtype, config, kArchMismatch, [&](auto kernel) { return decltype(kernel)::can_implement(p); });
}

int sm90_gemm(DType dtype, Sm90Config config, Sm90Problem const& p, void* stream) {
  return with_instance(dtype, config, kArchMismatch, [&](auto kernel) { return decltype(kernel)::run(p, stream); });
}

std::size_t sm90_compress_workspace_size(DType dtype, int m, int k, int sm_count) {
#if WK_HAS_SM90
  return dtype == DType::kFloat16 ? Sm90Compressor<DType::kFloat16>::workspace_size(m, k, sm_count)
                                  : Sm90Compressor<DType::kBFloat16>::workspace_size(m, k, sm_count);
#else
  static_cast<void>(dtype), static_cast<void>(m), static_cast<void>(k), static_cast<void>(sm_count);
  return 0;
#endif
}

int sm90_compress(DType dtype, int m, int k, std::uintptr_t dense, std::uintptr_t values, std::uintptr_t meta,
                  std::uintptr_t workspace, int sm_count, void* stream) {
#if WK_HAS_SM90
  return dtype == DType::kFloat16
             ? Sm90Compressor<DType::kFloat16>::run(m, k, dense, values, meta, workspace, sm_count, stream)
             : Sm90Compressor<DType::kBFloat16>::run(m, k, dense, values, meta, workspace, sm_count, stream);
#else
  static_cast<void>(dtype), static_cast<void>(m), static_cast<void>(k), static_cast<void>(dense);
  static_cast<void>(values), static_cast<void>(meta), static_cast<void>(workspace), static_cast<void>(sm_count);
  static_cast<void>(stream);
  return kArchMismatch;
#endif
}

}  // namespace wanda_kernels
