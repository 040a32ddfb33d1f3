// logits_io.hpp - shared by llama-logits-cpu and llama-logits-cuda: the token
// file and the logits file they exchange.
//
// Token file (text): line 1 the prompt ids, line 2 the decode ids fed to
// every sequence (teacher forcing), line 3 the prompt lengths of the batch
// (each sequence b is the prompt's first len_b ids).
// Logits file: float32, [(1 + steps) x batch x vocab] (prefill, then each
// decode step), preceded by three int32: steps + 1, batch, vocab.
#pragma once

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace pyramidinfer::llama_io {

struct TokenFile {
  std::vector<std::int32_t> prompt, feed;
  std::vector<int> lens;
  std::vector<std::vector<std::int32_t>> prompts() const {
    std::vector<std::vector<std::int32_t>> p;
    for (int n : lens) p.emplace_back(prompt.begin(), prompt.begin() + n);
    return p;
  }
};

inline std::vector<std::int64_t> parse_line(const std::string& line) {
  std::istringstream in(line);
  std::vector<std::int64_t> v;
  std::int64_t x;
  while (in >> x) v.push_back(x);
  return v;
}

inline TokenFile read_tokens(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error("cannot open " + path);
  std::string a, b, c;
  std::getline(f, a), std::getline(f, b), std::getline(f, c);
  TokenFile t;
  for (auto x : parse_line(a)) t.prompt.push_back(std::int32_t(x));
  for (auto x : parse_line(b)) t.feed.push_back(std::int32_t(x));
  for (auto x : parse_line(c)) t.lens.push_back(int(x));
  if (t.lens.empty()) t.lens.push_back(int(t.prompt.size()));
  for (int n : t.lens)
    if (n < 1 || n > int(t.prompt.size())) throw std::runtime_error("bad prompt length in " + path);
  return t;
}

inline void write_tokens(const std::string& path, const TokenFile& t) {
  std::ofstream f(path);
  for (auto x : t.prompt) f << x << ' ';
  f << '\n';
  for (auto x : t.feed) f << x << ' ';
  f << '\n';
  for (auto x : t.lens) f << x << ' ';
  f << '\n';
}

struct LogitsWriter {
  std::FILE* f = nullptr;
  LogitsWriter(const std::string& path, int rows, int batch, int vocab) {
    f = std::fopen(path.c_str(), "wb");
    if (!f) throw std::runtime_error("cannot write " + path);
    const std::int32_t h[3] = {rows, batch, vocab};
    std::fwrite(h, sizeof(h), 1, f);
  }
  void write(const float* p, std::size_t n) { std::fwrite(p, sizeof(float), n, f); }
  ~LogitsWriter() {
    if (f) std::fclose(f);
  }
};

}  // namespace pyramidinfer::llama_io
