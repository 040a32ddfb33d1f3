// Command lines for the option parsers' tests: argv built from strings, and
// the cli::UsageError a bad one throws.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "serve/serve_options.hpp"

namespace pyramidinfer::serve::test {

/// parse(argc, argv) over the program name and `args`.
template <class Parse>
auto parse_args(Parse parse, std::vector<std::string> args) {
  args.insert(args.begin(), "prog");
  std::vector<const char*> v;
  for (const auto& a : args) v.push_back(a.c_str());
  return parse(int(v.size()), v.data());
}

/// The message of the cli::UsageError parse throws for `args` ("" when it throws none).
template <class Parse>
std::string usage_error(Parse parse, std::vector<std::string> args) {
  try {
    parse_args(parse, std::move(args));
  } catch (const cli::UsageError& e) {
    return e.what();
  }
  return "";
}

}  // namespace pyramidinfer::serve::test
