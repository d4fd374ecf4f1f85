// CUTLASS 3.x sm90a 2:4 sparse GEMM (sparse wgmma, TMA, warp-specialized), fp16/bf16
// with fp32 accumulation. See sparse24_sm90.h for the operands.
//
// This file is compiled once per (dtype, configuration), with
// -DWK_SM90_DTYPE=wanda_kernels::DType::k... -DWK_SM90_CONFIG=wanda_kernels::Sm90Config::k...
// (CMakeLists.txt), and only for -gencode=arch=compute_90a,code=sm_90a: each kernel
// takes minutes and gigabytes to compile, so one translation unit each lets the build
// run them in parallel (or not) as memory allows. Plain sm_90 would compile the
// kernel body to an "Arch conditional MMA instruction" abort, so it is never built.
// Each unit explicitly instantiates Sm90Kernel<WK_SM90_DTYPE, WK_SM90_CONFIG> (and,
// with -DWK_SM90_WITH_COMPRESSOR=1, CUTLASS's compressor for the dtype);
// sparse24_sm90_dispatch.cpp picks among the instances at run time.
#include <cuda_runtime.h>

#include <type_traits>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/kernel_hardware_info.h"
#include "cutlass/transform/device/transform_universal_adapter.hpp"
#include "cutlass/transform/kernel/sparse_gemm_compressor.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "sparse24_sm90.h"

#if !defined(WK_SM90_DTYPE) || !defined(WK_SM90_CONFIG)
#error "compile with -DWK_SM90_DTYPE=wanda_kernels::DType::k... -DWK_SM90_CONFIG=wanda_kernels::Sm90Config::k..."
#endif

namespace wanda_kernels {
namespace {

using namespace cute;

// The device the caller made current (the tensors' device) and its multiprocessors;
// false when the CUDA runtime cannot say which device is current.
bool current_device_info(int sm_count, cutlass::KernelHardwareInfo* info) {
  if (cudaGetDevice(&info->device_id) != cudaSuccess) return false;
  info->sm_count = sm_count;
  return true;
}

// Host-side checks and sizes: no device is involved, its id is not read.
cutlass::KernelHardwareInfo host_info(int sm_count) {
  cutlass::KernelHardwareInfo info;
  info.sm_count = sm_count;
  return info;
}

template <DType D>
struct ElementOf;
template <>
struct ElementOf<DType::kFloat16> {
  using type = cutlass::half_t;
};
template <>
struct ElementOf<DType::kBFloat16> {
  using type = cutlass::bfloat16_t;
};

// A configuration's tile shape, from the one table in sparse24_sm90.h.
template <Sm90Config C>
using TileShapeOf = Shape<Int<sm90_tile_shape(C).m>, Int<sm90_tile_shape(C).n>, Int<sm90_tile_shape(C).k>>;

// Cluster, mainloop schedule, epilogue schedule and tile scheduler per configuration.
template <Sm90Config C>
struct Sm90Tile;
template <>
struct Sm90Tile<Sm90Config::kDecode> {  // few tokens: one consumer warp group per 64-row tile
  using ClusterShape = Shape<_1, _1, _1>;
  using MainloopSchedule = cutlass::gemm::KernelTmaWarpSpecialized;
  using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecialized;
  using TileScheduler = void;  // not persistent: one CTA per output tile
};
template <>
struct Sm90Tile<Sm90Config::kLarge> {  // many tokens: the 1x2 cluster multicasts W tiles
  using ClusterShape = Shape<_1, _2, _1>;
  using MainloopSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
  using TileScheduler = void;  // persistent: the cooperative kernel's default
};
template <>
struct Sm90Tile<Sm90Config::kStreamK> {  // splits K across CTAs when output tiles are fewer than SMs
  using ClusterShape = Shape<_1, _1, _1>;
  using MainloopSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
  using TileScheduler = cutlass::gemm::StreamKScheduler;
};
template <>
struct Sm90Tile<Sm90Config::kWide> {  // many tokens: the 2x1 cluster multicasts each x tile to the
                                      // two CTAs of neighbouring W rows
  using ClusterShape = Shape<_2, _1, _1>;
  using MainloopSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
  using TileScheduler = void;  // persistent: the cooperative kernel's default
};

template <DType D, Sm90Config C>
struct Sm90Gemm {
  using Element = typename ElementOf<D>::type;
  using TileShape = TileShapeOf<C>;
  using Tile = Sm90Tile<C>;
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;  // 16-byte TMA granularity

  // y^T = D (M x N, column-major) = W x^T + bias per row: y (N x M) row-major.
  using FusionOp = cutlass::epilogue::fusion::LinCombPerRowBias<Element, float, Element, Element, float>;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, TileShape,
      typename Tile::ClusterShape, cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, cutlass::layout::ColumnMajor, kAlign,      // no C operand: beta is 0, no source read
      Element, cutlass::layout::ColumnMajor, kAlign,   // D
      typename Tile::EpilogueSchedule, FusionOp>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp,
      Element, cutlass::layout::RowMajor, kAlign,      // A: W, K-major, 2:4 compressed
      Element, cutlass::layout::ColumnMajor, kAlign,   // B: x^T, K-major
      float, TileShape, typename Tile::ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Tile::MainloopSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, typename Tile::TileScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using SparseConfig = typename CollectiveMainloop::SparseConfig;
  using ElementE = typename CollectiveMainloop::ElementE;

  // The metadata layout is that of a tile K of 128 for every configuration, which is
  // what lets one converted tensor serve all of them. tests/cpp/sm90_meta_layout.cpp
  // evaluates this very SparseConfig on the CPU to check wanda_kernels' conversion.
  static_assert(std::is_same_v<SparseConfig,
                               cutlass::Sm90GemmSparseConfig<cute::sparse_elem<2, Element>, cute::GMMA::Major::K,
                                                             cute::sparse_elem<8, uint8_t>, cute::Int<128>>>,
                "the kernel's sparse config differs from the one tests/cpp/sm90_meta_layout.cpp checks");
  static_assert(cute::size<1>(typename SparseConfig::TensorEAtom{}) == 128, "metadata atom K must be 128");
  static_assert(cute::size<0>(typename SparseConfig::TensorEAtom{}) == 64, "metadata atom M must be 64");

  static typename Gemm::Arguments arguments(Sm90Problem const& p, cutlass::KernelHardwareInfo const& info) {
    auto problem = make_shape(p.m, p.n, p.k, 1);
    auto layout_a = SparseConfig::fill_layoutA(problem);
    auto layout_e = SparseConfig::fill_layoutE(problem);
    // B = x^T: N x K with K contiguous, row stride ldx. D = y^T: M x N, column stride ldy.
    typename Kernel::StrideB stride_b = make_stride(int64_t(p.ldx), Int<1>{}, int64_t(0));
    typename Kernel::StrideD stride_d = make_stride(Int<1>{}, int64_t(p.ldy), int64_t(0));

    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        problem,
        {reinterpret_cast<Element const*>(p.values), layout_a, reinterpret_cast<Element const*>(p.x), stride_b,
         reinterpret_cast<ElementE const*>(p.meta), layout_e},
        {{}, nullptr, stride_d, reinterpret_cast<Element*>(p.y), stride_d},
        info};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    args.epilogue.thread.bias_ptr = reinterpret_cast<Element const*>(p.bias);  // null: no bias
    // Ignored by kDecode's non-persistent kernel, which has these arguments but launches
    // one CTA per tile in grid order.
    using Raster = decltype(args.scheduler.raster_order);
    static_assert(static_cast<int>(Raster::Heuristic) == static_cast<int>(Sm90Raster::kHeuristic) &&
                      static_cast<int>(Raster::AlongM) == static_cast<int>(Sm90Raster::kAlongM) &&
                      static_cast<int>(Raster::AlongN) == static_cast<int>(Sm90Raster::kAlongN),
                  "Sm90Raster must list CUTLASS's RasterOrderOptions in its order");
    args.scheduler.raster_order = static_cast<Raster>(static_cast<int>(p.schedule.raster));
    args.scheduler.max_swizzle_size = p.schedule.swizzle;
    if constexpr (C == Sm90Config::kStreamK) {
      if (p.schedule.splits > 1) {
        args.scheduler.splits = p.schedule.splits;
        args.scheduler.decomposition_mode = decltype(args.scheduler.decomposition_mode)::SplitK;
      }
    }
    return args;
  }
};

}  // namespace

template <DType D, Sm90Config C>
std::size_t Sm90Kernel<D, C>::workspace_size(Sm90Problem const& p) {
  using G = Sm90Gemm<D, C>;
  return G::Gemm::get_workspace_size(G::arguments(p, host_info(p.sm_count)));
}

template <DType D, Sm90Config C>
int Sm90Kernel<D, C>::can_implement(Sm90Problem const& p) {
  using G = Sm90Gemm<D, C>;
  return static_cast<int>(G::Gemm::can_implement(G::arguments(p, host_info(p.sm_count))));
}

template <DType D, Sm90Config C>
int Sm90Kernel<D, C>::run(Sm90Problem const& p, void* stream) {
  using G = Sm90Gemm<D, C>;
  cutlass::KernelHardwareInfo info;
  if (!current_device_info(p.sm_count, &info)) return static_cast<int>(cutlass::Status::kErrorInternal);
  typename G::Gemm gemm;
  auto args = G::arguments(p, info);
  auto status = gemm.can_implement(args);
  if (status != cutlass::Status::kSuccess) return static_cast<int>(status);
  auto s = static_cast<cudaStream_t>(stream);
  status = gemm.initialize(args, reinterpret_cast<void*>(p.workspace), s);
  if (status != cutlass::Status::kSuccess) return static_cast<int>(status);
  return static_cast<int>(gemm.run(s));
}

template struct Sm90Kernel<WK_SM90_DTYPE, WK_SM90_CONFIG>;

#if WK_SM90_WITH_COMPRESSOR
// CUTLASS's own sm90 compressor (dense 2:4 A -> values + E) for this dtype, with the
// kernels' sparse configuration. Not used by the library: the GPU tests compare it
// with wanda_kernels' conversion (matrices that decode the same).
namespace {
template <DType D>
using CompressorOf = cutlass::transform::device::TransformUniversalAdapter<
    cutlass::transform::kernel::StructuredSparseCompressor<
        Shape<int, int, int, int>, typename Sm90Gemm<D, WK_SM90_CONFIG>::Element, cutlass::layout::RowMajor,
        typename Sm90Gemm<D, WK_SM90_CONFIG>::SparseConfig, cutlass::arch::Sm90>>;

template <DType D>
typename CompressorOf<D>::Arguments compressor_arguments(int m, int k, std::uintptr_t dense, std::uintptr_t values,
                                                         std::uintptr_t meta, cutlass::KernelHardwareInfo const& info) {
  using StrideA = cutlass::gemm::TagToStrideA_t<cutlass::layout::RowMajor>;
  auto problem = make_shape(m, 1, k, 1);
  return typename CompressorOf<D>::Arguments{
      problem,
      {reinterpret_cast<void const*>(dense), cutlass::make_cute_packed_stride(StrideA{}, make_shape(m, k, 1)),
       reinterpret_cast<void*>(values), reinterpret_cast<void*>(meta)},
      info};
}
}  // namespace

template <DType D>
std::size_t Sm90Compressor<D>::workspace_size(int m, int k, int sm_count) {
  return CompressorOf<D>::get_workspace_size(compressor_arguments<D>(m, k, 16, 16, 16, host_info(sm_count)));
}

template <DType D>
int Sm90Compressor<D>::run(int m, int k, std::uintptr_t dense, std::uintptr_t values, std::uintptr_t meta,
                           std::uintptr_t workspace, int sm_count, void* stream) {
  cutlass::KernelHardwareInfo info;
  if (!current_device_info(sm_count, &info)) return static_cast<int>(cutlass::Status::kErrorInternal);
  auto args = compressor_arguments<D>(m, k, dense, values, meta, info);
  CompressorOf<D> op;
  auto status = op.can_implement(args);
  if (status != cutlass::Status::kSuccess) return static_cast<int>(status);
  auto s = static_cast<cudaStream_t>(stream);
  status = op.initialize(args, reinterpret_cast<void*>(workspace), s);
  if (status != cutlass::Status::kSuccess) return static_cast<int>(status);
  return static_cast<int>(op.run(s));
}

template struct Sm90Compressor<WK_SM90_DTYPE>;
#endif

}  // namespace wanda_kernels
