// json_lines.hpp - the serving tools' output: JSON lines appended to a file
// or written to stdout, and the value formats they use. Host only.
#pragma once

#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>

namespace pyramidinfer::serve {

/// An output file of JSON lines (appended), or stdout.
class JsonLines {
 public:
  explicit JsonLines(const std::string& path) : f_(path.empty() ? stdout : std::fopen(path.c_str(), "a")) {
    if (!f_) throw std::runtime_error("cannot open '" + path + "' for appending");
  }
  ~JsonLines() {
    if (f_ && f_ != stdout) std::fclose(f_);
  }
  JsonLines(const JsonLines&) = delete;
  JsonLines& operator=(const JsonLines&) = delete;
  void line(const std::string& s) {
    std::fputs(s.c_str(), f_);
    std::fputc('\n', f_);
    std::fflush(f_);
  }

 private:
  std::FILE* f_;
};

/// A number for JSON: 6 significant digits, null when not finite.
inline std::string num(double v) {
  if (!std::isfinite(v)) return "null";
  char b[64];
  std::snprintf(b, sizeof b, "%.6g", v);
  return b;
}
/// A JSON string of `s` (the tools' labels: no quote or backslash to escape).
inline std::string str(const std::string& s) { return "\"" + s + "\""; }

}  // namespace pyramidinfer::serve
