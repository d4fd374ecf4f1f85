// Argument checks for the host side of the extension.
//
// The module receives raw device pointers as integers, so the checks are about
// what a pointer-and-size interface can get wrong: null or misaligned pointers,
// sizes the kernel cannot tile. Each failure throws std::invalid_argument with the
// name of the argument; pybind11 turns it into a Python ValueError.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace wanda_kernels {

template <typename... Parts>
[[noreturn]] inline void fail(Parts const&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw std::invalid_argument(os.str());
}

}  // namespace wanda_kernels

// WK_CHECK(cond, message parts...): throw std::invalid_argument unless cond holds.
#define WK_CHECK(cond, ...)                                  \
  do {                                                       \
    if (!(cond)) ::wanda_kernels::fail(__VA_ARGS__);         \
  } while (0)

// WK_CHECK_PTR(name, ptr, align): ptr is non-null and aligned to `align` bytes.
#define WK_CHECK_PTR(name, ptr, align)                                                   \
  do {                                                                                   \
    WK_CHECK((ptr) != 0, name, " is a null pointer");                                    \
    WK_CHECK((ptr) % (align) == 0, name, " must be ", (align), "-byte aligned; got 0x", \
             std::hex, (ptr));                                                           \
  } while (0)

// WK_CHECK_MULTIPLE(name, value, multiple): value > 0 and a multiple of `multiple`.
#define WK_CHECK_MULTIPLE(name, value, multiple)                                  \
  WK_CHECK((value) > 0 && (value) % (multiple) == 0, name, " must be a positive " \
           "multiple of ", (multiple), "; got ", (value))
