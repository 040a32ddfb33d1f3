// cli.hpp - the strict command-line parsing that pyramid-generate and
// pyramid-eval share (no dependency: about 200 lines).
//
// Rules, the same for every flag of both tools:
//  - an argument that starts with '-' must be a known flag; anything else is
//    an error ("unknown option"), never prompt text. After "--" every
//    argument is positional, so a prompt may start with '-'.
//  - a flag takes its value from the next argument or after '=':
//    "--max-tokens 8" and "--max-tokens=8" are the same. A flag given twice
//    is an error.
//  - integers are whole decimal numbers, an optional '-' and digits only:
//    "5x", "1e3", "0x10", "+5", " 5" and "" are rejected, as are values
//    outside the flag's range.
//  - real numbers are decimal numbers as std::from_chars reads them
//    ("0.5", ".5", "5e-1"); trailing junk, nan and inf are rejected, and so
//    are values outside the flag's range.
//  - lists are comma-separated; an empty list or an empty item is an error.
// Every error is a cli::UsageError whose text names the flag and the value.
#pragma once

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

namespace pyramidinfer::cli {

/// A bad command line: the tools print it with a usage hint and exit 2.
struct UsageError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

inline std::string in_quotes(const std::string& s) { return "'" + s + "'"; }

/// A whole decimal integer in [lo, hi].
inline std::int64_t parse_int(const std::string& flag, const std::string& text, std::int64_t lo, std::int64_t hi) {
  std::int64_t v = 0;
  const char* first = text.data();
  const char* last = text.data() + text.size();
  const bool digits_only =
      !text.empty() && text.find_first_not_of("0123456789", text[0] == '-' ? 1 : 0) == std::string::npos &&
      text != "-";
  const auto r = digits_only ? std::from_chars(first, last, v) : std::from_chars_result{first, std::errc::invalid_argument};
  const std::string range = "[" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
  if (r.ec == std::errc::result_out_of_range || (r.ec == std::errc() && r.ptr == last && (v < lo || v > hi)))
    throw UsageError(flag + " " + in_quotes(text) + ": out of range, must be an integer in " + range);
  if (r.ec != std::errc() || r.ptr != last)
    throw UsageError(flag + " " + in_quotes(text) + ": not an integer (decimal digits only, e.g. 64; no 1e3, no 5x)");
  return v;
}

/// Which ends of a real range are included.
enum class Bounds { closed, open_low, open_high, open };

/// A finite decimal real number in the range lo..hi (ends as `b` says).
inline double parse_real(const std::string& flag, const std::string& text, double lo, double hi,
                         Bounds b = Bounds::closed) {
  double v = 0;
  const char* first = text.data();
  const char* last = text.data() + text.size();
  // from_chars takes no leading '+' or space; reject anything but a number.
  const bool plausible = !text.empty() && text.find_first_not_of("0123456789.eE-+") == std::string::npos;
  const auto r = plausible ? std::from_chars(first, last, v, std::chars_format::general)
                           : std::from_chars_result{first, std::errc::invalid_argument};
  if (r.ec == std::errc::result_out_of_range) throw UsageError(flag + " " + in_quotes(text) + ": out of range");
  if (r.ec != std::errc() || r.ptr != last || !std::isfinite(v))
    throw UsageError(flag + " " + in_quotes(text) + ": not a number (e.g. 0.5)");
  const bool lo_open = b == Bounds::open_low || b == Bounds::open;
  const bool hi_open = b == Bounds::open_high || b == Bounds::open;
  const bool ok = (lo_open ? v > lo : v >= lo) && (hi_open ? v < hi : v <= hi);
  if (!ok) {
    auto num = [](double x) {
      std::string s = std::to_string(x);
      while (s.size() > 1 && s.back() == '0') s.pop_back();
      if (!s.empty() && s.back() == '.') s.pop_back();
      return s;
    };
    throw UsageError(flag + " " + in_quotes(text) + ": must be in " + (lo_open ? "(" : "[") + num(lo) + ", " + num(hi) +
                     (hi_open ? ")" : "]"));
  }
  return v;
}

/// A comma-separated list with no empty items.
inline std::vector<std::string> parse_list(const std::string& flag, const std::string& text) {
  if (text.empty()) throw UsageError(flag + " " + in_quotes(text) + ": empty list");
  std::vector<std::string> out;
  std::size_t start = 0;
  for (;;) {
    const std::size_t comma = text.find(',', start);
    const std::string item = text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    if (item.empty()) throw UsageError(flag + " " + in_quotes(text) + ": empty item in the comma-separated list");
    out.push_back(item);
    if (comma == std::string::npos) return out;
    start = comma + 1;
  }
}

/// Edit distance, for "did you mean" hints.
inline std::size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<std::size_t> row(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    std::size_t diag = row[0];
    row[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

/// The flags of one tool and what each does with its value.
class Parser {
 public:
  explicit Parser(std::string tool) : tool_(std::move(tool)) {}

  /// A flag that takes a value: on(value) runs once per flag.
  Parser& value(std::string name, std::function<void(const std::string&)> on) {
    flags_.push_back({std::move(name), true, std::move(on), {}});
    return *this;
  }
  /// A flag without a value.
  Parser& toggle(std::string name, std::function<void()> on) {
    flags_.push_back({std::move(name), false, {}, std::move(on)});
    return *this;
  }

  /// Runs the flags' actions in order and returns the positional arguments.
  /// Throws UsageError for an unknown flag, a flag given twice, a missing
  /// value, or a positional argument when `positional` is false.
  std::vector<std::string> parse(int argc, const char* const* argv, bool positional) {
    std::vector<std::string> rest;
    std::vector<std::string> seen;
    bool options_done = false;
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i] ? argv[i] : "";
      if (options_done || a.empty() || a[0] != '-' || a == "-") {
        if (!positional) throw UsageError("unexpected argument " + in_quotes(a) + " (" + tool_ + " takes only flags)");
        rest.push_back(a);
        continue;
      }
      if (a == "--") {
        options_done = true;
        continue;
      }
      const std::size_t eq = a.find('=');
      const std::string name = a.substr(0, eq);
      const Flag* f = find(name);
      if (!f) throw UsageError("unknown option " + in_quotes(name) + hint(name));
      for (const auto& s : seen)
        if (s == f->name) throw UsageError(f->name + " given more than once");
      seen.push_back(f->name);
      if (!f->takes_value) {
        if (eq != std::string::npos) throw UsageError(f->name + " takes no value, got " + in_quotes(a.substr(eq + 1)));
        f->on_toggle();
        continue;
      }
      std::string v;
      if (eq != std::string::npos) {
        v = a.substr(eq + 1);
      } else {
        if (i + 1 >= argc || !argv[i + 1]) throw UsageError("missing value after " + f->name);
        v = argv[++i];
        if (v.size() > 2 && v.compare(0, 2, "--") == 0 && find(v.substr(0, v.find('='))))
          throw UsageError("missing value after " + f->name + " (got the option " + in_quotes(v) + ")");
      }
      f->on_value(v);
    }
    return rest;
  }

 private:
  struct Flag {
    std::string name;
    bool takes_value;
    std::function<void(const std::string&)> on_value;
    std::function<void()> on_toggle;
  };

  const Flag* find(const std::string& name) const {
    for (const auto& f : flags_)
      if (f.name == name) return &f;
    return nullptr;
  }

  std::string hint(const std::string& name) const {
    const Flag* best = nullptr;
    std::size_t best_d = 4;
    for (const auto& f : flags_) {
      const std::size_t d = edit_distance(name, f.name);
      if (d < best_d) best = &f, best_d = d;
    }
    return best ? " (did you mean " + best->name + "?)" : " (run with --help for the options)";
  }

  std::string tool_;
  std::vector<Flag> flags_;
};

}  // namespace pyramidinfer::cli
