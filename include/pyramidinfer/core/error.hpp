// Errors: every rejected argument throws pyramidinfer::Error naming the
// argument and its value; CUDA failures throw CudaError with file and line.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace pyramidinfer {

/// Thrown for invalid arguments. A call that throws it has changed nothing.
class Error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// Thrown when the CUDA runtime reports a failure.
class CudaError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

template <class V>
[[noreturn]] inline void throw_arg_error(const char* function, const char* argument, const V& value,
                                         const std::string& requirement) {
  std::ostringstream os;
  os << "pyramidinfer::" << function << ": argument '" << argument << "' = " << value << " "
     << requirement;
  throw Error(os.str());
}

}  // namespace detail
}  // namespace pyramidinfer

/// Rejects argument `arg` (whose current value is `value`) unless `cond` holds.
/// `requirement` completes the sentence "argument 'x' = v ..." e.g. "must be > 0".
#define PYRAMIDINFER_REQUIRE(cond, function, arg, value, requirement)                 \
  do {                                                                                 \
    if (!(cond)) ::pyramidinfer::detail::throw_arg_error(function, arg, value, requirement); \
  } while (0)
