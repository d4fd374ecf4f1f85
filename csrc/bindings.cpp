// pybind11 module wanda_kernels._C: the 2:4 sparse GEMM behind a pointer-and-stream
// interface. No libtorch: tensors arrive as data_ptr() integers and the CUDA stream as
// torch.cuda.current_stream().cuda_stream, so one build serves any torch version.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "checks.h"
#include "cutlass/version.h"
#include "sparse24_gemm.h"

namespace py = pybind11;
using namespace wanda_kernels;

namespace {

DType to_dtype(int dtype) {
  WK_CHECK(dtype == 0 || dtype == 1, "dtype must be 0 (float16) or 1 (bfloat16); got ", dtype);
  return static_cast<DType>(dtype);
}

Config to_config(int config) {
  WK_CHECK(config == 0 || config == 1, "config must be 0 (decode) or 1 (large); got ", config);
  return static_cast<Config>(config);
}

Sparse24Problem make_problem(Config config, int m, int n, int k, std::uintptr_t values, std::uintptr_t meta,
                             std::uintptr_t x, std::int64_t ldb, std::uintptr_t out, std::int64_t ldd) {
  int tb_m, tb_n, tb_k, align_n;
  config_shape(config, &tb_m, &tb_n, &tb_k, &align_n);
  WK_CHECK_MULTIPLE("m (out_features)", m, 32);
  WK_CHECK_MULTIPLE("k (in_features)", k, tb_k);
  WK_CHECK(n > 0, "n (tokens) must be positive; got ", n);
  WK_CHECK(n % align_n == 0, "n (tokens) must be a multiple of ", align_n, " for config ",
           static_cast<int>(config), "; got ", n);
  WK_CHECK_PTR("values", values, 16);
  WK_CHECK_PTR("meta", meta, 16);
  WK_CHECK_PTR("x", x, 16);
  WK_CHECK_PTR("out", out, 2 * align_n);
  WK_CHECK(ldb >= k && ldb % 8 == 0, "x row stride (ldb) must be >= k and a multiple of 8; got ", ldb);
  WK_CHECK(ldd >= n && ldd % align_n == 0, "out row stride (ldd) must be >= n and a multiple of ", align_n,
           "; got ", ldd);
  return Sparse24Problem{m, n, k, values, meta, x, ldb, out, ldd};
}

}  // namespace

PYBIND11_MODULE(_C, mod) {
  mod.doc() =
      "CUTLASS 2:4 sparse GEMM: out (m x n, row-major) = W (m x k, compressed 2:4) @ x^T, x (n x k row-major).";

  mod.def(
      "sparse24_gemm",
      [](int dtype, int config, int m, int n, int k, std::uintptr_t values, std::uintptr_t meta, std::uintptr_t x,
         std::int64_t ldb, std::uintptr_t out, std::int64_t ldd, std::uintptr_t stream) {
        auto p = make_problem(to_config(config), m, n, k, values, meta, x, ldb, out, ldd);
        py::gil_scoped_release release;  // the launch is asynchronous; nothing Python-side is touched
        return sparse24_gemm(to_dtype(dtype), to_config(config), p, reinterpret_cast<void*>(stream));
      },
      py::arg("dtype"), py::arg("config"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("values"),
      py::arg("meta"), py::arg("x"), py::arg("ldb"), py::arg("out"), py::arg("ldd"), py::arg("stream"),
      "Launch on `stream`; returns a cutlass::Status code (0 = success).");

  mod.def(
      "can_implement",
      [](int dtype, int config, int m, int n, int k, std::uintptr_t values, std::uintptr_t meta, std::uintptr_t x,
         std::int64_t ldb, std::uintptr_t out, std::int64_t ldd) {
        auto p = make_problem(to_config(config), m, n, k, values, meta, x, ldb, out, ldd);
        return sparse24_can_implement(to_dtype(dtype), to_config(config), p);
      },
      py::arg("dtype"), py::arg("config"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("values"),
      py::arg("meta"), py::arg("x"), py::arg("ldb"), py::arg("out"), py::arg("ldd"),
      "CUTLASS's host-side check of the problem (no GPU needed); returns a cutlass::Status code.");

  mod.def("status_string", &status_string, py::arg("status"), "cutlass::Status code as text.");

  mod.def(
      "config_shape",
      [](int config) {
        int tb_m, tb_n, tb_k, align_n;
        config_shape(to_config(config), &tb_m, &tb_n, &tb_k, &align_n);
        return py::make_tuple(tb_m, tb_n, tb_k, align_n);
      },
      py::arg("config"), "(threadblock M, N, K, N alignment) of a tile configuration.");

  mod.attr("cuda_archs") = WK_CUDA_ARCHS;
  mod.attr("cutlass_version") = py::str("{}.{}.{}").format(CUTLASS_MAJOR, CUTLASS_MINOR, CUTLASS_PATCH);
}
