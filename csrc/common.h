// What the extension's kernels share: the element type enum (exported to Python as
// wanda_kernels._C.DType) and the text of a cutlass::Status.
#pragma once

namespace wanda_kernels {

// Element type of W, x and y; fp32 accumulation throughout.
enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

// cutlass::Status (every entry point returns one as int, 0 = success) as text.
char const* status_string(int status);

}  // namespace wanda_kernels
