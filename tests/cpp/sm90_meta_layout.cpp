// Dumps CUTLASS's own sm90 2:4 metadata layout, evaluated on the CPU.
//
//   sm90_meta_layout <M> <K> <dtype: f16|bf16>
//
// Prints "M64 K128" (the padded extents) and then, for every row m < M64 and every
// group of 4 columns g < K128 / 4, the logical offset fill_layoutE(M, N, K, 1) gives
// to element (m, 4g), one row per line. tests/test_sm90_meta.py compiles this with
// plain g++ (cute layouts are host code) and compares it with
// wanda_kernels._layout24.sm90_offsets and wanda_kernels.meta_sm80_to_sm90.
//
// The configuration is the one csrc/sparse24_sm90.cu's kernels use: a K-major sparse A
// of 16-bit elements (sparse_elem<2, T>), 8-bit metadata elements covering 8 logical
// elements each (sparse_elem<8, uint8_t>), tile K clamped to 128 by the builder.
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "cutlass/gemm/collective/builders/sm90_sparse_config.inl"

template <class T>
int dump(int m, int k) {
  using namespace cute;
  using Config = cutlass::Sm90GemmSparseConfig<sparse_elem<2, T>, GMMA::Major::K, sparse_elem<8, uint8_t>, Int<128>>;
  auto layout = Config::fill_layoutE(make_tuple(m, 1, k, 1));
  int const m_pad = int(size<0>(layout));
  int const k_pad = int(size<1>(layout));
  std::printf("%d %d\n", m_pad, k_pad);
  for (int r = 0; r < m_pad; ++r) {
    for (int g = 0; g < k_pad / 4; ++g) {
      std::printf(g ? " %lld" : "%lld", static_cast<long long>(layout(r, 4 * g, 0)));
    }
    std::printf("\n");
  }
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s M K f16|bf16\n", argv[0]);
    return 2;
  }
  int const m = std::atoi(argv[1]), k = std::atoi(argv[2]);
  if (m <= 0 || k <= 0) {
    std::fprintf(stderr, "M and K must be positive; got %s %s\n", argv[1], argv[2]);
    return 2;
  }
  if (!std::strcmp(argv[3], "f16")) return dump<cutlass::half_t>(m, k);
  if (!std::strcmp(argv[3], "bf16")) return dump<cutlass::bfloat16_t>(m, k);
  std::fprintf(stderr, "dtype must be f16 or bf16; got %s\n", argv[3]);
  return 2;
}
