// CUTLASS 3.x sm90a 2:4 sparse GEMM (sparse wgmma, TMA, warp-specialized), fp16/bf16
// with fp32 accumulation. See sparse24_sm90.h for the operands.
//
// This file is compiled once per (dtype, configuration), with -DWK_SM90_DTYPE and
// -DWK_SM90_CONFIG, and only for -gencode=arch=compute_90a,code=sm_90a: each kernel
// takes minutes and gigabytes to compile, so one translation unit each lets the build
// run them in parallel (or not) as memory allows. Plain sm_90 would compile the
// kernel body to an "Arch conditional MMA instruction" abort, so it is never built.
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
#include "sparse24_sm90_instances.h"

#if !defined(WK_SM90_DTYPE) || !defined(WK_SM90_CONFIG)
#error "compile with -DWK_SM90_DTYPE=<0|1> -DWK_SM90_CONFIG=<0|1|2> (CMakeLists.txt does)"
#endif

namespace wanda_kernels {
namespace {

using namespace cute;

// The device the caller made current (the tensors' device) and its multiprocessors.
cutlass::KernelHardwareInfo current_device_info(int sm_count) {
  cutlass::KernelHardwareInfo info;
  cudaGetDevice(&info.device_id);
  info.sm_count = sm_count;
  return info;
}

template <int Dtype>
struct ElementOf;
template <>
struct ElementOf<0> {
  using type = cutlass::half_t;
};
template <>
struct ElementOf<1> {
  using type = cutlass::bfloat16_t;
};

// Tile, cluster, mainloop schedule, epilogue schedule and tile scheduler per config.
template <int Config>
struct Sm90Tile;
template <>
struct Sm90Tile<0> {  // decode: small M tile so a 4096-row weight gives 64 tiles; K 256 for long TMA bursts
  using TileShape = Shape<_64, _32, _256>;
  using ClusterShape = Shape<_1, _1, _1>;
  using MainloopSchedule = cutlass::gemm::KernelTmaWarpSpecialized;
  using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecialized;
  using TileScheduler = void;  // persistent, data-parallel
};
template <>
struct Sm90Tile<1> {  // many tokens: CUTLASS example 62's tile; the 1x2 cluster multicasts W tiles
  using TileShape = Shape<_128, _128, _128>;
  using ClusterShape = Shape<_1, _2, _1>;
  using MainloopSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
  using TileScheduler = void;
};
template <>
struct Sm90Tile<2> {  // decode, stream-K: splits K across CTAs when output tiles are fewer than SMs
  using TileShape = Shape<_128, _32, _256>;
  using ClusterShape = Shape<_1, _1, _1>;
  using MainloopSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
  using TileScheduler = cutlass::gemm::StreamKScheduler;
};
template <>
struct Sm90Tile<3> {  // many tokens, wide: 128 x 256 output tiles halve the W re-reads of config 1;
                      // the 2x1 cluster multicasts each x tile to the two CTAs of neighbouring W rows
  using TileShape = Shape<_128, _256, _128>;
  using ClusterShape = Shape<_2, _1, _1>;
  using MainloopSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
  using TileScheduler = void;
};

template <int Dtype, int Config>
struct Sm90Gemm {
  using Element = typename ElementOf<Dtype>::type;
  using Tile = Sm90Tile<Config>;
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;  // 16-byte TMA granularity

  // y^T = D (M x N, column-major) = W x^T + bias per row: y (N x M) row-major.
  using FusionOp = cutlass::epilogue::fusion::LinCombPerRowBias<Element, float, Element, Element, float>;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, typename Tile::TileShape,
      typename Tile::ClusterShape, cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, cutlass::layout::ColumnMajor, kAlign,      // no C operand: beta is 0, no source read
      Element, cutlass::layout::ColumnMajor, kAlign,   // D
      typename Tile::EpilogueSchedule, FusionOp>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp,
      Element, cutlass::layout::RowMajor, kAlign,      // A: W, K-major, 2:4 compressed
      Element, cutlass::layout::ColumnMajor, kAlign,   // B: x^T, K-major
      float, typename Tile::TileShape, typename Tile::ClusterShape,
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

  static typename Gemm::Arguments arguments(Sparse24Sm90Problem const& p) {
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
        current_device_info(p.sm_count)};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    args.epilogue.thread.bias_ptr = reinterpret_cast<Element const*>(p.bias);  // null: no bias
    return args;
  }
};

using Instance = Sm90Gemm<WK_SM90_DTYPE, WK_SM90_CONFIG>;

}  // namespace

std::size_t WK_SM90_FN(workspace_size)(Sparse24Sm90Problem const& p) {
  return Instance::Gemm::get_workspace_size(Instance::arguments(p));
}

int WK_SM90_FN(can_implement)(Sparse24Sm90Problem const& p) {
  return static_cast<int>(Instance::Gemm::can_implement(Instance::arguments(p)));
}

int WK_SM90_FN(run)(Sparse24Sm90Problem const& p, void* stream) {
  typename Instance::Gemm gemm;
  auto args = Instance::arguments(p);
  auto status = gemm.can_implement(args);
  if (status != cutlass::Status::kSuccess) return static_cast<int>(status);
  auto s = static_cast<cudaStream_t>(stream);
  status = gemm.initialize(args, reinterpret_cast<void*>(p.workspace), s);
  if (status != cutlass::Status::kSuccess) return static_cast<int>(status);
  return static_cast<int>(gemm.run(s));
}

#if WK_SM90_CONFIG == 0
// CUTLASS's own sm90 compressor (dense 2:4 A -> values + E), one per dtype, compiled
// with the decode configuration. Not used by the library: the GPU tests compare it with
// wanda_kernels' conversion (matrices that decode the same).
namespace {
using Compressor = cutlass::transform::device::TransformUniversalAdapter<
    cutlass::transform::kernel::StructuredSparseCompressor<Shape<int, int, int, int>, Instance::Element,
                                                           cutlass::layout::RowMajor, Instance::SparseConfig,
                                                           cutlass::arch::Sm90>>;

Compressor::Arguments compressor_arguments(int m, int k, std::uintptr_t dense, std::uintptr_t values,
                                           std::uintptr_t meta, int sm_count) {
  using StrideA = cutlass::gemm::TagToStrideA_t<cutlass::layout::RowMajor>;
  auto problem = make_shape(m, 1, k, 1);
  return Compressor::Arguments{
      problem,
      {reinterpret_cast<void const*>(dense), cutlass::make_cute_packed_stride(StrideA{}, make_shape(m, k, 1)),
       reinterpret_cast<void*>(values), reinterpret_cast<void*>(meta)},
      current_device_info(sm_count)};
}
}  // namespace

std::size_t WK_SM90_FN(compress_workspace_size)(int m, int k, int sm_count) {
  return Compressor::get_workspace_size(compressor_arguments(m, k, 16, 16, 16, sm_count));
}

int WK_SM90_FN(compress)(int m, int k, std::uintptr_t dense, std::uintptr_t values, std::uintptr_t meta,
                         std::uintptr_t workspace, int sm_count, void* stream) {
  auto args = compressor_arguments(m, k, dense, values, meta, sm_count);
  Compressor op;
  auto status = op.can_implement(args);
  if (status != cutlass::Status::kSuccess) return static_cast<int>(status);
  auto s = static_cast<cudaStream_t>(stream);
  status = op.initialize(args, reinterpret_cast<void*>(workspace), s);
  if (status != cutlass::Status::kSuccess) return static_cast<int>(status);
  return static_cast<int>(op.run(s));
}
#endif

}  // namespace wanda_kernels
