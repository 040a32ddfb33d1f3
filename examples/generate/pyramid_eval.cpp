// pyramid-eval: does the model keep its quality with a compressed cache?
//
// For each policy and KV budget (the share of a full cache's slots held after
// prefill, matched across policies through the planner):
//  - continuation perplexity: prefill n tokens of real text with compression,
//    then teacher-force the next m tokens through the decode path, scoring each;
//  - passkey retrieval: a 5-digit key hidden at some depth of real text, asked
//    for at the end, answered greedily.
// Progress goes to stderr (steps done of the total, time left); results to
// <out>.csv and <out>.json (checked writable before the run starts).
// The command line is strict (options.hpp, cli.hpp): unknown flags, bad
// numbers, fractions outside (0, 1] and empty lists are errors (exit 2).
//
//   pyramid-eval [--model PATH] [--text FILE] [--prefill N] [--continue M]
//                [--passages P] [--passkey-trials K] [--policies a,b,...]
//                [--fractions 1,0.7,...] [--out PREFIX]
#include <chrono>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "generate/options.hpp"
#include "generate/policies.hpp"
#include "generate/pyramid_engine.hpp"
#include "llama/generate.hpp"
#include "llama/tokenizer.hpp"

namespace {

using namespace pyramidinfer;
using namespace pyramidinfer::llama;

using Options = EvalOptions;

struct Row {
  std::string policy, budget;
  double ratio = 1, kv_prefill = 1, kv_end = 1, nll = 0, ppl = 0, passkey = 0, seconds = 0, compress_seconds = 0;
};

/// Progress on stderr: steps done of the total and the time left, estimated
/// from the tokens processed so far (a passage is prefill + continue tokens, a
/// passkey trial prefill + 8).
class Progress {
 public:
  void add(long long steps, double tokens_each) {
    total_steps_ += steps;
    total_tokens_ += double(steps) * tokens_each;
  }
  void start() { t0_ = std::chrono::steady_clock::now(); }
  /// One step of `tokens` done; `what` says which.
  void step(double tokens, const std::string& what) {
    ++done_steps_;
    done_tokens_ += tokens;
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
    const double left = done_tokens_ > 0 ? elapsed * (total_tokens_ - done_tokens_) / done_tokens_ : 0.0;
    std::fprintf(stderr, "[%lld/%lld %3.0f%%, %s elapsed, ~%s left] %s\n", done_steps_, total_steps_,
                 total_tokens_ > 0 ? 100.0 * done_tokens_ / total_tokens_ : 100.0, clock(elapsed).c_str(),
                 clock(left).c_str(), what.c_str());
  }

 private:
  static std::string clock(double s) {
    const long long t = (long long)(s + 0.5);
    char buf[32];
    if (t >= 3600)
      std::snprintf(buf, sizeof buf, "%lldh%02lldm%02llds", t / 3600, t / 60 % 60, t % 60);
    else
      std::snprintf(buf, sizeof buf, "%lldm%02llds", t / 60, t % 60);
    return buf;
  }
  long long total_steps_ = 0, done_steps_ = 0;
  double total_tokens_ = 0, done_tokens_ = 0;
  std::chrono::steady_clock::time_point t0_ = std::chrono::steady_clock::now();
};

/// Fails now, not after the whole run, when PREFIX.csv or PREFIX.json cannot
/// be written. Opens for append (nothing is truncated) and removes a file it
/// created.
void check_writable(const std::string& path) {
  const bool existed = std::ifstream(path).good();
  {
    std::ofstream f(path, std::ios::app);
    if (!f) throw std::runtime_error("--out: cannot write " + path + ": " + std::strerror(errno));
  }
  if (!existed) std::remove(path.c_str());
}

double token_nll(const float* logits, std::size_t vocab, std::int32_t target) {
  float m = logits[0];
  for (std::size_t i = 1; i < vocab; ++i) m = std::max(m, logits[i]);
  double sum = 0;
  for (std::size_t i = 0; i < vocab; ++i) sum += std::exp(double(logits[i] - m));
  return -(double(logits[target] - m) - std::log(sum));
}

/// Sum of NLLs of tokens[n, n + m) given tokens[0, n), teacher-forced.
template <class Compressor>
double continuation_nll(PyramidEngine<Compressor>& engine, const std::vector<std::int32_t>& tokens, int n, int m,
                        double& kv_prefill, double& kv_end, std::size_t full_slots_prefill) {
  Matrix logits = engine.prefill({std::vector<std::int32_t>(tokens.begin(), tokens.begin() + n)}, m);
  kv_prefill = double(engine.slots_held()) / double(full_slots_prefill);
  double nll = 0;
  for (int t = 0; t < m; ++t) {
    nll += token_nll(logits.row(0), logits.cols, tokens[std::size_t(n + t)]);
    if (t + 1 < m) logits = engine.decode({tokens[std::size_t(n + t)]});
  }
  kv_end = double(engine.slots_held()) / double(full_slots_prefill / std::size_t(n) * std::size_t(n + m - 1));
  return nll;
}

/// A passkey prompt of about n tokens: filler text with the key at `depth`.
std::vector<std::int32_t> passkey_prompt(const Tokenizer& tok, const std::vector<std::int32_t>& filler, int n,
                                         double depth, const std::string& key) {
  const std::vector<std::int32_t> needle =
      tok.encode(" The pass key is " + key + ". Remember it. " + key + " is the pass key. ", false);
  const std::vector<std::int32_t> question = tok.encode("\nWhat is the pass key? The pass key is", false);
  const int body = n - int(needle.size() + question.size());
  if (body < 1)
    throw std::invalid_argument("--prefill " + std::to_string(n) + " is too short for a passkey prompt (needs > " +
                                std::to_string(needle.size() + question.size()) +
                                " tokens); raise --prefill or pass --passkey-trials 0");
  std::vector<std::int32_t> out(filler.begin(), filler.begin() + body);
  out.insert(out.begin() + int(depth * body), needle.begin(), needle.end());
  out.insert(out.end(), question.begin(), question.end());
  return out;
}

template <class Compressor>
bool passkey_found(PyramidEngine<Compressor>& engine, const Tokenizer& tok, const std::vector<std::int32_t>& prompt,
                   const std::string& key) {
  Matrix logits = engine.prefill({prompt}, 8);
  std::vector<std::int32_t> answer;
  for (int t = 0; t < 8; ++t) {
    answer.push_back(argmax(logits.row(0), logits.cols));
    if (t + 1 < 8) logits = engine.decode({answer.back()});
  }
  return tok.decode(answer).find(key) != std::string::npos;
}

Row evaluate(const Model& model, const Tokenizer& tok, const std::vector<std::int32_t>& text, const Options& o,
             const PolicyOptions& policy, const std::string& budget, Progress& progress) {
  Row row{policy.name, budget, policy.ratio};
  const auto t0 = std::chrono::steady_clock::now();
  const LlamaConfig& c = model.config();
  const std::size_t full_slots = std::size_t(c.n_layers) * c.n_kv_heads * std::size_t(o.prefill);
  std::mt19937 rng(1234);  // the same keys and depths for every policy
  with_policy(c, policy, [&](auto pc) {
    PyramidEngine<decltype(pc)> engine(model, pc);
    double nll = 0, kvp = 0, kve = 0;
    const std::size_t stride = (text.size() - (std::size_t(o.prefill) + std::size_t(o.cont))) / std::size_t(std::max(o.passages, 1));
    for (int p = 0; p < o.passages; ++p) {
      const std::vector<std::int32_t> passage(text.begin() + std::ptrdiff_t(p * stride),
                                              text.begin() + std::ptrdiff_t(p * stride + std::size_t(o.prefill) + std::size_t(o.cont)));
      nll += continuation_nll(engine, passage, o.prefill, o.cont, kvp, kve, full_slots);
      row.kv_prefill = kvp;
      row.kv_end = kve;
      char what[160];
      std::snprintf(what, sizeof what, "%s %s passage %d/%d: ppl so far %.3f", policy.name.c_str(), budget.c_str(),
                    p + 1, o.passages, std::exp(nll / (double(p + 1) * o.cont)));
      progress.step(double(o.prefill) + o.cont, what);
    }
    row.nll = o.passages ? nll / (double(o.passages) * o.cont) : 0;
    row.ppl = std::exp(row.nll);
    int found = 0;
    for (int k = 0; k < o.passkey_trials; ++k) {
      const std::string key = std::to_string(10000 + rng() % 90000);
      const double depth = 0.1 + 0.8 * double(k) / std::max(o.passkey_trials - 1, 1);
      found += passkey_found(engine, tok, passkey_prompt(tok, text, o.prefill, depth, key), key);
      char what[160];
      std::snprintf(what, sizeof what, "%s %s passkey %d/%d: %d found so far", policy.name.c_str(), budget.c_str(), k + 1,
                    o.passkey_trials, found);
      progress.step(double(o.prefill) + 8, what);
    }
    row.passkey = o.passkey_trials ? double(found) / o.passkey_trials : 0;
    row.compress_seconds = engine.compression_seconds();
  });
  row.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::fprintf(stderr, "%-16s %-8s ratio %.4f  kv %.3f (end %.3f)  ppl %.4f  passkey %.2f  (%.1f s)\n",
               row.policy.c_str(), row.budget.c_str(), row.ratio, row.kv_prefill, row.kv_end, row.ppl, row.passkey,
               row.seconds);
  return row;
}

void write_results(const std::vector<Row>& rows, const Options& o) {
  std::ofstream csv(o.out + ".csv"), json(o.out + ".json");
  if (!csv) throw std::runtime_error("--out: cannot write " + o.out + ".csv: " + std::strerror(errno));
  if (!json) throw std::runtime_error("--out: cannot write " + o.out + ".json: " + std::strerror(errno));
  csv << "policy,budget,ratio,kv_fraction_prefill,kv_fraction_end,nll,perplexity,passkey_accuracy,seconds,"
         "compression_seconds\n";
  json << "{\"prefill\": " << o.prefill << ", \"continue\": " << o.cont << ", \"passages\": " << o.passages
       << ", \"passkey_trials\": " << o.passkey_trials << ", \"rows\": [\n";
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    csv << r.policy << "," << r.budget << "," << r.ratio << "," << r.kv_prefill << "," << r.kv_end << "," << r.nll
        << "," << r.ppl << "," << r.passkey << "," << r.seconds << "," << r.compress_seconds << "\n";
    json << "  {\"policy\": \"" << r.policy << "\", \"budget\": \"" << r.budget << "\", \"ratio\": " << r.ratio
         << ", \"kv_fraction_prefill\": " << r.kv_prefill << ", \"kv_fraction_end\": " << r.kv_end
         << ", \"nll\": " << r.nll << ", \"perplexity\": " << r.ppl << ", \"passkey_accuracy\": " << r.passkey
         << ", \"seconds\": " << r.seconds << "}" << (i + 1 < rows.size() ? "," : "") << "\n";
  }
  json << "]}\n";
  csv.close();
  json.close();
  if (!csv) throw std::runtime_error("--out: could not write " + o.out + ".csv");
  if (!json) throw std::runtime_error("--out: could not write " + o.out + ".json");
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  try {
    o = parse_eval_options(argc, argv);
  } catch (const cli::UsageError& e) {
    std::cerr << "pyramid-eval: " << e.what() << "\n(pyramid-eval --help lists the options)\n";
    return 2;
  }
  if (o.help) {
    std::cout << eval_usage();
    return 0;
  }
  try {
    check_writable(o.out + ".csv");
    check_writable(o.out + ".json");
    const GgufFile file = GgufFile::open(o.model);
    const Tokenizer tok = Tokenizer::from_gguf(file);
    const Model model = Model::from_gguf(file);
    const std::int64_t need = std::int64_t(o.prefill) + o.cont;  // no int overflow for huge values
    if (model.config().context_length && need > std::int64_t(model.config().context_length))
      throw std::invalid_argument("--prefill " + std::to_string(o.prefill) + " + --continue " + std::to_string(o.cont) +
                                  " exceed the model's context length of " +
                                  std::to_string(model.config().context_length) + " tokens");
    std::ifstream in(o.text);
    if (!in) throw std::runtime_error("cannot read --text " + o.text);
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const std::vector<std::int32_t> ids = tok.encode(text, false);
    if (std::int64_t(ids.size()) < need + 1)
      throw std::invalid_argument("--text has " + std::to_string(ids.size()) + " tokens; need > --prefill " +
                                  std::to_string(o.prefill) + " + --continue " + std::to_string(o.cont));
    std::fprintf(stderr, "text: %zu tokens; prefill %d, continue %d\n", ids.size(), o.prefill, o.cont);
    if (o.passkey_trials > 0) passkey_prompt(tok, ids, o.prefill, 0.5, "12345");  // too short fails now, not later

    // Every (policy, budget) to evaluate, then the runs with progress.
    std::vector<std::pair<PolicyOptions, std::string>> jobs;
    for (const std::string& name : o.policies) {
      PolicyOptions p;
      p.name = name;
      if (name == "full") {
        p.ratio = 1.0;
        jobs.emplace_back(p, "1.00");
        continue;
      }
      if (name == "pyramid") jobs.emplace_back(p, "paper");  // the paper's defaults
      if (name == "pyramid45") {  // fixed settings (policies.hpp): no budget sweep
        p.ratio = Pyramid45::final_ratio;
        jobs.emplace_back(p, "plan45");
        continue;
      }
      for (double f : o.fractions) {
        if (f >= 1.0) continue;  // the full cache is its own row
        p.ratio = ratio_for_fraction(model.config(), p, o.prefill, f);
        char budget[16];
        std::snprintf(budget, sizeof budget, "%.2f", f);
        jobs.emplace_back(p, budget);
      }
    }
    if (jobs.empty())
      throw std::invalid_argument("nothing to evaluate: --fractions has only 1 and --policies has no full, pyramid "
                                  "or pyramid45");
    Progress progress;
    progress.add((long long)jobs.size() * o.passages, double(o.prefill) + o.cont);
    progress.add((long long)jobs.size() * o.passkey_trials, double(o.prefill) + 8);
    progress.start();
    std::vector<Row> rows;
    for (const auto& [p, budget] : jobs) rows.push_back(evaluate(model, tok, ids, o, p, budget, progress));
    write_results(rows, o);
    std::fprintf(stderr, "wrote %s.csv and %s.json\n", o.out.c_str(), o.out.c_str());
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "pyramid-eval: " << e.what() << "\n";
    return 1;
  }
}
