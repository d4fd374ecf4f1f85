// CUTLASS sm80 2:4 sparse GEMM (mma.sp), fp16 and bf16 with fp32 accumulation.
//
// One template, explicitly instantiated for {fp16, bf16} x {decode, large}. Runs on
// compute capability 8.x and 9.x (Hopper executes these sm80 tensor-core kernels).
#include "sparse24_sm80.h"

#include <cuda_runtime.h>

#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/device/gemm_sparse.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"

namespace wanda_kernels {
namespace {

template <int TbM, int TbN, int WarpM, int WarpN, int Stages, int AlignN>
struct TileConfig {
  // Threadblock K is 64 in both configurations: CUTLASS requires K % tile-K == 0
  // (out-of-bounds metadata is not a valid code), so one K constraint serves both.
  using Threadblock = cutlass::gemm::GemmShape<TbM, TbN, 64>;
  using Warp = cutlass::gemm::GemmShape<WarpM, WarpN, 64>;
  static constexpr int kStages = Stages;
  // Elements per epilogue store along N (the contiguous dim of D): N % AlignN == 0.
  static constexpr int kAlignN = AlignN;
};

// Few tokens (decode): a small tile, so that a 4096-row weight still spreads over
// ~64-128 threadblocks. CUTLASS requires N % 8 == 0 in both configurations (B is
// loaded 8 elements at a time): the caller pads the tokens to a multiple of 8.
using DecodeConfig = TileConfig<64, 64, 32, 32, 4, 8>;
// Many tokens (prefill): the 128x128 tile of CUTLASS's sm80 sparse examples.
using LargeConfig = TileConfig<128, 128, 64, 64, 3, 8>;

template <typename Element, typename Cfg>
using SparseGemm24 = cutlass::gemm::device::SparseGemm<
    Element, cutlass::layout::RowMajor,     // A: compressed W values, M x K/2
    Element, cutlass::layout::ColumnMajor,  // B: x^T, K x N (x row-major N x K)
    Element, cutlass::layout::RowMajor,     // C, D: M x N (sm80 SparseGemm has row-major C only)
    float,                                  // accumulate in fp32
    cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
    typename Cfg::Threadblock, typename Cfg::Warp,
    cutlass::gemm::GemmShape<16, 8, 32>,  // mma.sp.m16n8k32 for 16-bit types
    cutlass::epilogue::thread::LinearCombination<Element, Cfg::kAlignN, float, float>,
    cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, Cfg::kStages>;

template <typename Gemm>
typename Gemm::Arguments make_arguments(Sm80Problem const& p) {
  using ElementA = typename Gemm::ElementA;
  using ElementB = typename Gemm::ElementB;
  using ElementC = typename Gemm::ElementC;
  using ElementE = typename Gemm::ElementE;
  static_assert(sizeof(ElementE) == 2, "16-bit metadata expected for 16-bit operands");
  cutlass::gemm::GemmCoord size(p.m, p.n, p.k);
  int const meta_cols = p.k / Gemm::kSparse / Gemm::kElementsPerElementE;
  auto* d = reinterpret_cast<ElementC*>(p.d);
  return typename Gemm::Arguments(
      size,
      {reinterpret_cast<ElementA const*>(p.values), typename Gemm::LayoutA(p.k / Gemm::kSparse)},
      {reinterpret_cast<ElementB const*>(p.b), typename Gemm::LayoutB(p.ldb)},
      {d, typename Gemm::LayoutC(p.ldd)},  // C is not read: beta = 0
      {d, typename Gemm::LayoutC(p.ldd)},
      {reinterpret_cast<ElementE*>(p.meta), Gemm::LayoutE::packed({p.m, meta_cols})},
      {1.0f, 0.0f});
}

template <typename Gemm>
int can_implement(Sm80Problem const& p) {
  return static_cast<int>(Gemm::can_implement(make_arguments<Gemm>(p)));
}

template <typename Gemm>
int run(Sm80Problem const& p, cudaStream_t stream) {
  auto args = make_arguments<Gemm>(p);
  cutlass::Status status = Gemm::can_implement(args);
  if (status != cutlass::Status::kSuccess) return static_cast<int>(status);
  Gemm gemm;  // no split-K: no workspace
  status = gemm.initialize(args, nullptr, stream);
  if (status != cutlass::Status::kSuccess) return static_cast<int>(status);
  return static_cast<int>(gemm.run(stream));
}

}  // namespace

int sm80_can_implement(DType dtype, Sm80Config config, Sm80Problem const& p) {
  switch (dtype) {
    case DType::kFloat16:
      return config == Sm80Config::kLarge ? can_implement<SparseGemm24<cutlass::half_t, LargeConfig>>(p)
                                          : can_implement<SparseGemm24<cutlass::half_t, DecodeConfig>>(p);
    case DType::kBFloat16:
      return config == Sm80Config::kLarge ? can_implement<SparseGemm24<cutlass::bfloat16_t, LargeConfig>>(p)
                                          : can_implement<SparseGemm24<cutlass::bfloat16_t, DecodeConfig>>(p);
  }
  return static_cast<int>(cutlass::Status::kInvalid);
}

int sm80_gemm(DType dtype, Sm80Config config, Sm80Problem const& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat16:
      return config == Sm80Config::kLarge ? run<SparseGemm24<cutlass::half_t, LargeConfig>>(p, s)
                                          : run<SparseGemm24<cutlass::half_t, DecodeConfig>>(p, s);
    case DType::kBFloat16:
      return config == Sm80Config::kLarge ? run<SparseGemm24<cutlass::bfloat16_t, LargeConfig>>(p, s)
                                          : run<SparseGemm24<cutlass::bfloat16_t, DecodeConfig>>(p, s);
  }
  return static_cast<int>(cutlass::Status::kInvalid);
}

char const* status_string(int status) {
  return cutlassGetStatusString(static_cast<cutlass::Status>(status));
}

void sm80_config_shape(Sm80Config config, int* tb_m, int* tb_n, int* tb_k, int* align_n) {
  if (config == Sm80Config::kLarge) {
    *tb_m = LargeConfig::Threadblock::kM, *tb_n = LargeConfig::Threadblock::kN;
    *tb_k = LargeConfig::Threadblock::kK, *align_n = LargeConfig::kAlignN;
  } else {
    *tb_m = DecodeConfig::Threadblock::kM, *tb_n = DecodeConfig::Threadblock::kN;
    *tb_k = DecodeConfig::Threadblock::kK, *align_n = DecodeConfig::kAlignN;
  }
}

}  // namespace wanda_kernels
