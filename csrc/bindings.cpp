// pybind11 module wanda_kernels._C: the 2:4 sparse GEMM behind a pointer-and-stream
// interface. No libtorch: tensors arrive as data_ptr() integers and the CUDA stream as
// torch.cuda.current_stream().cuda_stream, so one build serves any torch version.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "checks.h"
#include "cutlass/version.h"
#include "sparse24_sm80.h"
#include "sparse24_sm90.h"

namespace py = pybind11;
using namespace wanda_kernels;

namespace {

Sm80Problem make_sm80_problem(Sm80Config config, int m, int n, int k, std::uintptr_t values, std::uintptr_t meta,
                              std::uintptr_t x, std::int64_t ldb, std::uintptr_t out, std::int64_t ldd) {
  int tb_m, tb_n, tb_k, align_n;
  sm80_config_shape(config, &tb_m, &tb_n, &tb_k, &align_n);
  WK_CHECK_MULTIPLE("m (out_features)", m, 32);
  WK_CHECK_MULTIPLE("k (in_features)", k, tb_k);
  WK_CHECK(n > 0, "n (tokens) must be positive; got ", n);
  WK_CHECK(n % align_n == 0, "n (tokens) must be a multiple of ", align_n, "; got ", n);
  WK_CHECK_PTR("values", values, 16);
  WK_CHECK_PTR("meta", meta, 16);
  WK_CHECK_PTR("x", x, 16);
  WK_CHECK_PTR("out", out, 2 * align_n);
  WK_CHECK(ldb >= k && ldb % 8 == 0, "x row stride (ldb) must be >= k and a multiple of 8; got ", ldb);
  WK_CHECK(ldd >= n && ldd % align_n == 0, "out row stride (ldd) must be >= n and a multiple of ", align_n,
           "; got ", ldd);
  return Sm80Problem{m, n, k, values, meta, x, ldb, out, ldd};
}

Sm90Problem make_sm90_problem(int m, int n, int k, std::uintptr_t values, std::uintptr_t meta, std::uintptr_t x,
                              std::int64_t ldx, std::uintptr_t y, std::int64_t ldy, std::uintptr_t bias,
                              std::uintptr_t workspace, int sm_count, Sm90Schedule schedule) {
  WK_CHECK_MULTIPLE("m (out_features)", m, 8);  // y rows are TMA-stored: 16-byte multiples
  WK_CHECK_MULTIPLE("k (in_features)", k, 64);  // the values' row length of the shared 2:4 format
  WK_CHECK(n > 0, "n (tokens) must be positive; got ", n);
  WK_CHECK_PTR("values", values, 16);
  WK_CHECK_PTR("meta", meta, 16);
  WK_CHECK_PTR("x", x, 16);
  WK_CHECK_PTR("y", y, 16);
  WK_CHECK(bias % 16 == 0, "bias must be 0 (none) or 16-byte aligned; got address ", bias);
  WK_CHECK(ldx >= k && ldx % 8 == 0, "x row stride (ldx) must be >= k and a multiple of 8; got ", ldx);
  WK_CHECK(ldy >= m && ldy % 8 == 0, "y row stride (ldy) must be >= m and a multiple of 8; got ", ldy);
  WK_CHECK(sm_count > 0, "sm_count must be positive; got ", sm_count);
  int const swizzle = schedule.swizzle;
  WK_CHECK(swizzle == 1 || swizzle == 2 || swizzle == 4 || swizzle == 8, "swizzle must be 1, 2, 4 or 8; got ",
           swizzle);
  WK_CHECK(schedule.splits >= 1, "splits must be >= 1; got ", schedule.splits);
  return Sm90Problem{m, n, k, values, meta, x, ldx, y, ldy, bias, workspace, sm_count, schedule};
}

}  // namespace

PYBIND11_MODULE(_C, mod) {
  mod.doc() =
      "CUTLASS 2:4 sparse GEMM. sm80: out (m x n, row-major) = W (m x k, compressed 2:4) @ x^T; "
      "sm90: y (n x m, row-major) = x @ W^T + bias; x (n x k) row-major in both.";

  // Enums, not integers, for what selects a kernel: a wrong value fails in pybind's
  // argument conversion, naming the expected type.
  py::enum_<DType>(mod, "DType", "Element type of W, x and y (fp32 accumulation).")
      .value("float16", DType::kFloat16)
      .value("bfloat16", DType::kBFloat16);
  py::enum_<Sm80Config>(mod, "Sm80Config", "Tile configuration of the sm80 kernel.")
      .value("decode", Sm80Config::kDecode)
      .value("large", Sm80Config::kLarge);
  py::enum_<Sm90Config>(mod, "Sm90Config", "Tile configuration of the sm90a kernels.")
      .value("decode", Sm90Config::kDecode)
      .value("large", Sm90Config::kLarge)
      .value("streamk", Sm90Config::kStreamK)
      .value("wide", Sm90Config::kWide);
  py::enum_<Sm90Raster>(mod, "Sm90Raster", "Order in which the persistent sm90a schedulers walk output tiles.")
      .value("heuristic", Sm90Raster::kHeuristic)
      .value("along_m", Sm90Raster::kAlongM)
      .value("along_n", Sm90Raster::kAlongN);

  mod.def(
      "sm80_gemm",
      [](DType dtype, Sm80Config config, int m, int n, int k, std::uintptr_t values, std::uintptr_t meta,
         std::uintptr_t x, std::int64_t ldb, std::uintptr_t out, std::int64_t ldd, std::uintptr_t stream) {
        auto p = make_sm80_problem(config, m, n, k, values, meta, x, ldb, out, ldd);
        py::gil_scoped_release release;  // the launch is asynchronous; nothing Python-side is touched
        return sm80_gemm(dtype, config, p, reinterpret_cast<void*>(stream));
      },
      py::arg("dtype"), py::arg("config"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("values"),
      py::arg("meta"), py::arg("x"), py::arg("ldb"), py::arg("out"), py::arg("ldd"), py::arg("stream"),
      "Launch on `stream`; returns a cutlass::Status code (0 = success).");

  mod.def(
      "sm80_can_implement",
      [](DType dtype, Sm80Config config, int m, int n, int k, std::uintptr_t values, std::uintptr_t meta,
         std::uintptr_t x, std::int64_t ldb, std::uintptr_t out, std::int64_t ldd) {
        auto p = make_sm80_problem(config, m, n, k, values, meta, x, ldb, out, ldd);
        return sm80_can_implement(dtype, config, p);
      },
      py::arg("dtype"), py::arg("config"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("values"),
      py::arg("meta"), py::arg("x"), py::arg("ldb"), py::arg("out"), py::arg("ldd"),
      "CUTLASS's host-side check of the problem (no GPU needed); returns a cutlass::Status code.");

  // Hopper (sm90a): y (n x m) = x (n x k) @ W^T + bias, W compressed with sm90 metadata.
  mod.def(
      "sm90_gemm",
      [](DType dtype, Sm90Config config, int m, int n, int k, std::uintptr_t values, std::uintptr_t meta,
         std::uintptr_t x, std::int64_t ldx, std::uintptr_t y, std::int64_t ldy, std::uintptr_t bias,
         std::uintptr_t workspace, int sm_count, std::uintptr_t stream, int swizzle, Sm90Raster raster, int splits) {
        auto p = make_sm90_problem(m, n, k, values, meta, x, ldx, y, ldy, bias, workspace, sm_count,
                                   Sm90Schedule{swizzle, raster, splits});
        py::gil_scoped_release release;
        return sm90_gemm(dtype, config, p, reinterpret_cast<void*>(stream));
      },
      py::arg("dtype"), py::arg("config"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("values"),
      py::arg("meta"), py::arg("x"), py::arg("ldx"), py::arg("y"), py::arg("ldy"), py::arg("bias"),
      py::arg("workspace"), py::arg("sm_count"), py::arg("stream"), py::arg("swizzle") = 1,
      py::arg("raster") = Sm90Raster::kHeuristic, py::arg("splits") = 1,
      "Launch the sm90a kernel on `stream`; returns a cutlass::Status code (0 = success). swizzle, raster and "
      "splits (split-K slices, streamk only) set the persistent scheduler's tile order; the defaults are CUTLASS's.");

  mod.def(
      "sm90_can_implement",
      [](DType dtype, Sm90Config config, int m, int n, int k, std::uintptr_t values, std::uintptr_t meta,
         std::uintptr_t x, std::int64_t ldx, std::uintptr_t y, std::int64_t ldy, std::uintptr_t bias, int sm_count,
         int swizzle, Sm90Raster raster, int splits) {
        auto p = make_sm90_problem(m, n, k, values, meta, x, ldx, y, ldy, bias, 0, sm_count,
                                   Sm90Schedule{swizzle, raster, splits});
        return sm90_can_implement(dtype, config, p);
      },
      py::arg("dtype"), py::arg("config"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("values"),
      py::arg("meta"), py::arg("x"), py::arg("ldx"), py::arg("y"), py::arg("ldy"), py::arg("bias"),
      py::arg("sm_count"), py::arg("swizzle") = 1, py::arg("raster") = Sm90Raster::kHeuristic, py::arg("splits") = 1,
      "CUTLASS's host-side check of an sm90a problem (no GPU needed); a cutlass::Status code.");

  mod.def(
      "sm90_workspace_size",
      [](DType dtype, Sm90Config config, int m, int n, int k, int sm_count, int swizzle, Sm90Raster raster,
         int splits) {
        // Pointers do not enter the size; aligned placeholders pass the checks.
        auto p = make_sm90_problem(m, n, k, 16, 16, 16, k, 16, m, 0, 0, sm_count,
                                   Sm90Schedule{swizzle, raster, splits});
        return sm90_workspace_size(dtype, config, p);
      },
      py::arg("dtype"), py::arg("config"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("sm_count"),
      py::arg("swizzle") = 1, py::arg("raster") = Sm90Raster::kHeuristic, py::arg("splits") = 1,
      "Bytes of device workspace an sm90a launch needs (0 for the data-parallel configurations).");

  mod.def(
      "sm90_config_shape",
      [](Sm90Config config) {
        auto tile = sm90_tile_shape(config);
        return py::make_tuple(tile.m, tile.n, tile.k);
      },
      py::arg("config"), "(tile M, N, K) of an sm90a configuration.");

  mod.def(
      "sm90_compress_workspace_size",
      [](DType dtype, int m, int k, int sm_count) {
        return sm90_compress_workspace_size(dtype, m, k, sm_count);
      },
      py::arg("dtype"), py::arg("m"), py::arg("k"), py::arg("sm_count"),
      "Bytes of device workspace CUTLASS's sm90 compressor needs.");

  mod.def(
      "sm90_compress",
      [](DType dtype, int m, int k, std::uintptr_t dense, std::uintptr_t values, std::uintptr_t meta,
         std::uintptr_t workspace, int sm_count, std::uintptr_t stream) {
        WK_CHECK_MULTIPLE("m", m, 64);
        WK_CHECK_MULTIPLE("k", k, 128);
        WK_CHECK_PTR("dense", dense, 16);
        WK_CHECK_PTR("values", values, 16);
        WK_CHECK_PTR("meta", meta, 16);
        WK_CHECK(sm_count > 0, "sm_count must be positive; got ", sm_count);
        py::gil_scoped_release release;
        return sm90_compress(dtype, m, k, dense, values, meta, workspace, sm_count,
                             reinterpret_cast<void*>(stream));
      },
      py::arg("dtype"), py::arg("m"), py::arg("k"), py::arg("dense"), py::arg("values"), py::arg("meta"),
      py::arg("workspace"), py::arg("sm_count"), py::arg("stream"),
      "CUTLASS's sm90 compressor (for tests): dense 2:4 (m x k) -> values (m x k/2) + sm90 metadata.");

  mod.def("sm90_built", &sm90_built, "Whether this build holds the sm90a (Hopper sparse wgmma) kernels.");

  mod.def("status_string", &status_string, py::arg("status"), "cutlass::Status code as text.");

  mod.def(
      "sm80_config_shape",
      [](Sm80Config config) {
        int tb_m, tb_n, tb_k, align_n;
        sm80_config_shape(config, &tb_m, &tb_n, &tb_k, &align_n);
        return py::make_tuple(tb_m, tb_n, tb_k, align_n);
      },
      py::arg("config"), "(threadblock M, N, K, N alignment) of a tile configuration.");

  mod.attr("cuda_archs") = WK_CUDA_ARCHS;
  // Raised whenever a function's arguments change, so that wanda_kernels refuses a _C
  // built from older sources with a message to rebuild (loader.INTERFACE_VERSION).
  mod.attr("interface_version") = 2;
  mod.attr("cutlass_version") = py::str("{}.{}.{}").format(CUTLASS_MAJOR, CUTLASS_MINOR, CUTLASS_PATCH);
}
