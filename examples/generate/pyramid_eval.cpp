// pyramid-eval: does the model keep its quality with a compressed cache?
//
// For each policy and KV budget (the share of a full cache's slots held after
// prefill, matched across policies through the planner):
//  - continuation perplexity on P passages taken round-robin from several
//    texts: prefill n tokens with compression, then teacher-force the next m
//    tokens through the decode path, scoring each. Every policy sees the same
//    passages, and each is compared with the full cache passage by passage
//    (paired): the mean relative change of the passages' perplexities, its
//    standard error, and on how many passages the policy was better (a win)
//    or worse (a loss);
//  - key-value lookup (the "passkey" prompts): a "[key: value]" line (key a
//    noun, value another word) at a depth cycling over 5% .. 95% of n tokens
//    of text, then "[key:" at the end, answered greedily; right when the
//    answer's first word is the value.
// The passkey probe it replaces (a 5-digit key, "What is the pass key?")
// was found 12-50% of the time by SmolLM2-135M even with a full cache: the
// model changes the last digit or copies a wrong one. With a word for a
// value and the bracketed line repeated as the question it finds the value
// with a full cache (20 of 20 prompts at 1K tokens when this was written);
// with 2 or 4 such lines in the text (asking for one) it found 85-90%, below
// what a probe of the cache needs, so kLookupPairs is 1 (the code handles
// more, the others spread evenly, for a stronger model).
//
// Progress goes to stderr (steps done of the total, time left); results to
// <out>.csv (one line per policy and budget) and <out>.json (the same, plus
// the passages, the per-passage perplexities and changes, and the lookups by
// depth), both checked writable before the run starts. The command line is
// strict (options.hpp, cli.hpp): unknown flags, bad numbers, fractions outside
// (0, 1] and empty lists are errors (exit 2).
//
//   pyramid-eval [--model PATH] [--text FILE,...] [--prefill N] [--continue M]
//                [--passages P] [--passkey-trials K] [--policies a,b,...]
//                [--fractions 1,0.7,...] [--out PREFIX]
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>
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

/// Where a passage comes from: tokens [begin, begin + n + m) of text `text`.
struct Passage {
  int text = 0;
  std::size_t begin = 0;
};

/// One lookup prompt's outcome.
struct Lookup {
  double depth = 0;
  bool found = false;
};

/// The paired comparison of one row with the full cache over the passages.
struct Paired {
  double mean = 0, se = 0, pooled = 0;  ///< relative perplexity changes (0.01 = +1%)
  int wins = 0, losses = 0, ties = 0;
  std::vector<double> change;           ///< per passage
};

struct Row {
  std::string policy, budget;
  double ratio = 1, kv_prefill = 1, kv_end = 1, nll = 0, ppl = 0, passkey = 0, seconds = 0, compress_seconds = 0;
  std::vector<double> passage_nll;  ///< mean NLL per scored token, per passage
  std::vector<Lookup> lookups;
  Paired vs_full;
};

/// Progress on stderr: steps done of the total and the time left, estimated
/// from the tokens processed so far (a passage is prefill + continue tokens, a
/// lookup prompt prefill + 8).
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

/// Passage i: text i mod T, its (i / T)-th block of n + m tokens. Blocks do
/// not overlap, so the passages are independent samples of each text.
std::vector<Passage> make_passages(const std::vector<std::vector<std::int32_t>>& texts, const Options& o) {
  const std::size_t len = std::size_t(o.prefill) + std::size_t(o.cont), T = texts.size();
  std::vector<Passage> out;
  for (int i = 0; i < o.passages; ++i) {
    const int t = int(std::size_t(i) % T);
    const std::size_t block = std::size_t(i) / T;
    if ((block + 1) * len > texts[std::size_t(t)].size())
      throw std::invalid_argument("--passages " + std::to_string(o.passages) + ": --text " + o.texts[std::size_t(t)] +
                                  " has " + std::to_string(texts[std::size_t(t)].size()) + " tokens, too few for " +
                                  std::to_string(block + 1) + " passages of --prefill + --continue = " +
                                  std::to_string(len) + " tokens; pass fewer passages or more texts");
    out.push_back({t, block * len});
  }
  return out;
}

// ------------------------------------------------------------ key-value lookup

const char* const kLookupKeys[] = {"apple", "river", "candle", "falcon", "marble", "orchid",
                                   "violin", "harbor", "copper", "meadow", "lantern", "glacier"};
const char* const kLookupValues[] = {"tiger", "purple", "rocket", "silver", "banana", "winter", "castle", "pencil",
                                     "thunder", "garden", "mirror", "dragon", "yellow", "anchor", "cotton", "planet"};
constexpr int kLookupPairs = 1, kLookupAnswerTokens = 4, kLookupMinFiller = 32;

/// Lookup prompt `trial`: n tokens of filler (text trial mod T) with
/// kLookupPairs "[key: value]" lines, pair `ask` at `depth` and the others
/// spread evenly, then "[key:" of pair `ask`. The same for every policy.
struct LookupPrompt {
  std::vector<std::int32_t> tokens;
  std::string value;
  double depth = 0;
};

LookupPrompt lookup_prompt(const Tokenizer& tok, const std::vector<std::vector<std::int32_t>>& texts, int n,
                           int trial) {
  std::mt19937 rng(std::uint32_t(1000 + trial));
  std::vector<int> keys(std::size(kLookupKeys)), values(std::size(kLookupValues));
  for (std::size_t i = 0; i < keys.size(); ++i) keys[i] = int(i);
  for (std::size_t i = 0; i < values.size(); ++i) values[i] = int(i);
  std::shuffle(keys.begin(), keys.end(), rng);
  std::shuffle(values.begin(), values.end(), rng);  // distinct values: a wrong pair's value is wrong
  const int ask = trial % kLookupPairs;
  LookupPrompt p;
  p.depth = 0.05 + 0.9 * double(trial % 5) / 4.0;
  p.value = kLookupValues[values[std::size_t(ask)]];
  std::vector<std::vector<std::int32_t>> lines;
  std::size_t used = 0;
  for (int i = 0; i < kLookupPairs; ++i) {
    lines.push_back(tok.encode(std::string("\n[") + kLookupKeys[keys[std::size_t(i)]] + ": " +
                                   kLookupValues[values[std::size_t(i)]] + "]\n",
                               false));
    used += lines.back().size();
  }
  const std::vector<std::int32_t> question =
      tok.encode(std::string("\n[") + kLookupKeys[keys[std::size_t(ask)]] + ":", false);
  // At least kLookupMinFiller tokens of text around the line, so that its
  // depth means something.
  const std::int64_t body = std::int64_t(n) - std::int64_t(used + question.size());
  if (body < kLookupMinFiller)
    throw std::invalid_argument("--prefill " + std::to_string(n) +
                                " is too short for a passkey prompt (a key-value lookup: needs >= " +
                                std::to_string(used + question.size() + kLookupMinFiller) +
                                " tokens); raise --prefill or pass --passkey-trials 0");
  const std::vector<std::int32_t>& filler = texts[std::size_t(trial) % texts.size()];
  const std::size_t start = std::min(std::size_t(trial / int(texts.size())) * 997,
                                     filler.size() > std::size_t(body) ? filler.size() - std::size_t(body) : 0);
  if (filler.size() < start + std::size_t(body))
    throw std::invalid_argument("--text has too few tokens for a passkey prompt of --prefill " + std::to_string(n));
  p.tokens.assign(filler.begin() + std::ptrdiff_t(start), filler.begin() + std::ptrdiff_t(start + std::size_t(body)));
  // Insert from the deepest position up, so earlier insertions keep their place.
  std::vector<std::pair<std::size_t, int>> at;
  for (int i = 0; i < kLookupPairs; ++i)
    at.emplace_back(std::size_t((i == ask ? p.depth : (i + 0.5) / kLookupPairs) * double(body)), i);
  std::sort(at.rbegin(), at.rend());
  for (const auto& [pos, i] : at)
    p.tokens.insert(p.tokens.begin() + std::ptrdiff_t(pos), lines[std::size_t(i)].begin(), lines[std::size_t(i)].end());
  p.tokens.insert(p.tokens.end(), question.begin(), question.end());
  return p;
}

/// The greedy answer's first word is the value.
template <class Compressor>
bool lookup_found(PyramidEngine<Compressor>& engine, const Tokenizer& tok, const LookupPrompt& prompt) {
  Matrix logits = engine.prefill({prompt.tokens}, kLookupAnswerTokens);
  std::vector<std::int32_t> answer;
  for (int t = 0; t < kLookupAnswerTokens; ++t) {
    answer.push_back(argmax(logits.row(0), logits.cols));
    if (t + 1 < kLookupAnswerTokens) logits = engine.decode({answer.back()});
  }
  std::string text = tok.decode(answer);
  text.erase(0, text.find_first_not_of(" \t\n"));
  const std::size_t end = text.find_first_not_of("abcdefghijklmnopqrstuvwxyz");
  return text.substr(0, end) == prompt.value;
}

// --------------------------------------------------------------------- runs

Row evaluate(const Model& model, const Tokenizer& tok, const std::vector<std::vector<std::int32_t>>& texts,
             const std::vector<Passage>& passages, const Options& o, const PolicyOptions& policy,
             const std::string& budget, Progress& progress) {
  Row row{policy.name, budget, policy.ratio};
  const auto t0 = std::chrono::steady_clock::now();
  const LlamaConfig& c = model.config();
  const std::size_t full_slots = std::size_t(c.n_layers) * c.n_kv_heads * std::size_t(o.prefill);
  with_policy(c, policy, [&](auto pc) {
    PyramidEngine<decltype(pc)> engine(model, pc);
    double nll = 0, kvp = 0, kve = 0, kvp_sum = 0, kve_sum = 0;
    for (std::size_t i = 0; i < passages.size(); ++i) {
      const std::vector<std::int32_t>& text = texts[std::size_t(passages[i].text)];
      const std::vector<std::int32_t> tokens(
          text.begin() + std::ptrdiff_t(passages[i].begin),
          text.begin() + std::ptrdiff_t(passages[i].begin + std::size_t(o.prefill) + std::size_t(o.cont)));
      const double sum = continuation_nll(engine, tokens, o.prefill, o.cont, kvp, kve, full_slots);
      row.passage_nll.push_back(sum / o.cont);
      nll += sum;
      kvp_sum += kvp, kve_sum += kve;
      char what[160];
      std::snprintf(what, sizeof what, "%s %s passage %zu/%zu: ppl %.3f (so far %.3f)", policy.name.c_str(),
                    budget.c_str(), i + 1, passages.size(), std::exp(sum / o.cont),
                    std::exp(nll / (double(i + 1) * o.cont)));
      progress.step(double(o.prefill) + o.cont, what);
    }
    if (!passages.empty()) {
      row.nll = nll / (double(passages.size()) * o.cont);
      row.ppl = std::exp(row.nll);
      row.kv_prefill = kvp_sum / double(passages.size());
      row.kv_end = kve_sum / double(passages.size());
    }
    int found = 0;
    for (int k = 0; k < o.passkey_trials; ++k) {
      const LookupPrompt prompt = lookup_prompt(tok, texts, o.prefill, k);
      const bool ok = lookup_found(engine, tok, prompt);
      row.lookups.push_back({prompt.depth, ok});
      found += ok;
      char what[160];
      std::snprintf(what, sizeof what, "%s %s lookup %d/%d (depth %.2f): %d found so far", policy.name.c_str(),
                    budget.c_str(), k + 1, o.passkey_trials, prompt.depth, found);
      progress.step(double(o.prefill) + kLookupAnswerTokens, what);
    }
    row.passkey = o.passkey_trials ? double(found) / o.passkey_trials : 0;
    row.compress_seconds = engine.compression_seconds();
  });
  row.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return row;
}

/// Paired statistics of `row` against the full cache's per-passage NLLs.
Paired compare(const Row& row, const Row& full) {
  Paired p;
  const std::size_t P = row.passage_nll.size();
  if (P == 0) return p;
  double sum_nll = 0, sum_full = 0;
  for (std::size_t i = 0; i < P; ++i) {
    const double d = row.passage_nll[i] - full.passage_nll[i];
    p.change.push_back(std::expm1(d));  // ppl ratio - 1, exactly 0 for equal NLLs
    p.mean += p.change.back() / double(P);
    p.wins += d < 0, p.losses += d > 0, p.ties += d == 0;
    sum_nll += row.passage_nll[i], sum_full += full.passage_nll[i];
  }
  double ss = 0;
  for (double x : p.change) ss += (x - p.mean) * (x - p.mean);
  p.se = P > 1 ? std::sqrt(ss / double(P - 1) / double(P)) : 0.0;
  p.pooled = std::expm1((sum_nll - sum_full) / double(P));
  return p;
}

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (char ch : s) {
    if (ch == '"' || ch == '\\') out += '\\';
    if (static_cast<unsigned char>(ch) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", unsigned(ch));
      out += buf;
    } else {
      out += ch;
    }
  }
  return out + "\"";
}

template <class V>
std::string json_array(const std::vector<V>& v) {
  std::ostringstream os;
  os.precision(10);
  os << "[";
  for (std::size_t i = 0; i < v.size(); ++i) os << (i ? ", " : "") << v[i];
  return os.str() + "]";
}

void write_results(const std::vector<Row>& rows, const std::vector<Passage>& passages, const Options& o) {
  std::ofstream csv(o.out + ".csv"), json(o.out + ".json");
  if (!csv) throw std::runtime_error("--out: cannot write " + o.out + ".csv: " + std::strerror(errno));
  if (!json) throw std::runtime_error("--out: cannot write " + o.out + ".json: " + std::strerror(errno));
  csv.precision(10);
  json.precision(10);
  csv << "policy,budget,ratio,kv_fraction_prefill,kv_fraction_end,nll,perplexity,ppl_change_mean,ppl_change_se,"
         "ppl_change_pooled,wins,losses,ties,passkey_accuracy,seconds,compression_seconds\n";
  json << "{\"prefill\": " << o.prefill << ", \"continue\": " << o.cont << ", \"passkey_trials\": " << o.passkey_trials
       << ",\n \"texts\": [";
  for (std::size_t i = 0; i < o.texts.size(); ++i) json << (i ? ", " : "") << json_string(o.texts[i]);
  json << "],\n \"passages\": [";
  for (std::size_t i = 0; i < passages.size(); ++i)
    json << (i ? ", " : "") << "{\"text\": " << passages[i].text << ", \"token_begin\": " << passages[i].begin << "}";
  json << "],\n \"rows\": [\n";
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    const Paired& p = r.vs_full;
    csv << r.policy << "," << r.budget << "," << r.ratio << "," << r.kv_prefill << "," << r.kv_end << "," << r.nll
        << "," << r.ppl << "," << p.mean << "," << p.se << "," << p.pooled << "," << p.wins << "," << p.losses << ","
        << p.ties << "," << r.passkey << "," << r.seconds << "," << r.compress_seconds << "\n";
    std::vector<double> depths;
    std::vector<int> found;
    for (const Lookup& l : r.lookups) depths.push_back(l.depth), found.push_back(l.found ? 1 : 0);
    json << "  {\"policy\": " << json_string(r.policy) << ", \"budget\": " << json_string(r.budget)
         << ", \"ratio\": " << r.ratio << ", \"kv_fraction_prefill\": " << r.kv_prefill
         << ", \"kv_fraction_end\": " << r.kv_end << ", \"nll\": " << r.nll << ", \"perplexity\": " << r.ppl
         << ",\n   \"vs_full\": {\"ppl_change_mean\": " << p.mean << ", \"ppl_change_se\": " << p.se
         << ", \"ppl_change_pooled\": " << p.pooled << ", \"wins\": " << p.wins << ", \"losses\": " << p.losses
         << ", \"ties\": " << p.ties << ", \"ppl_change\": " << json_array(p.change) << "},\n   \"passage_nll\": "
         << json_array(r.passage_nll) << ",\n   \"passkey_accuracy\": " << r.passkey
         << ", \"passkey_depth\": " << json_array(depths) << ", \"passkey_found\": " << json_array(found)
         << ",\n   \"seconds\": " << r.seconds << ", \"compression_seconds\": " << r.compress_seconds << "}"
         << (i + 1 < rows.size() ? "," : "") << "\n";
  }
  json << "]}\n";
  csv.close();
  json.close();
  if (!csv) throw std::runtime_error("--out: could not write " + o.out + ".csv");
  if (!json) throw std::runtime_error("--out: could not write " + o.out + ".json");
}

void print_table(const std::vector<Row>& rows, int passages) {
  std::fprintf(stderr, "\n%-17s %-7s %6s %6s %9s  %-22s %-9s %7s\n", "policy", "budget", "kv", "kv_end", "ppl",
               "vs full: mean +- se", "W/L/T", "lookup");
  for (const Row& r : rows) {
    char change[48] = "-";
    if (passages > 0)
      std::snprintf(change, sizeof change, "%+7.2f%% +- %5.2f%%", 100 * r.vs_full.mean, 100 * r.vs_full.se);
    char wlt[32];
    std::snprintf(wlt, sizeof wlt, "%d/%d/%d", r.vs_full.wins, r.vs_full.losses, r.vs_full.ties);
    std::fprintf(stderr, "%-17s %-7s %6.3f %6.3f %9.4f  %-22s %-9s %6.0f%%\n", r.policy.c_str(), r.budget.c_str(),
                 r.kv_prefill, r.kv_end, r.ppl, change, wlt, 100 * r.passkey);
  }
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
    std::vector<std::vector<std::int32_t>> texts;
    for (const std::string& path : o.texts) {
      std::ifstream in(path);
      if (!in) throw std::runtime_error("cannot read --text " + path);
      const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      texts.push_back(tok.encode(text, false));
      if (std::int64_t(texts.back().size()) < need + 1)
        throw std::invalid_argument("--text " + path + " has " + std::to_string(texts.back().size()) +
                                    " tokens; need > --prefill " + std::to_string(o.prefill) + " + --continue " +
                                    std::to_string(o.cont));
      std::fprintf(stderr, "text %zu: %s, %zu tokens\n", texts.size() - 1, path.c_str(), texts.back().size());
    }
    const std::vector<Passage> passages = make_passages(texts, o);
    std::fprintf(stderr, "%zu passages, prefill %d, continue %d; %d lookup prompts\n", passages.size(), o.prefill,
                 o.cont, o.passkey_trials);
    if (o.passkey_trials > 0) lookup_prompt(tok, texts, o.prefill, 0);  // too short fails now, not later

    // Every (policy, budget) to evaluate, the full cache first (the others
    // are compared with it), then the runs with progress.
    std::vector<std::pair<PolicyOptions, std::string>> jobs;
    std::vector<std::string> names = o.policies;
    if (std::find(names.begin(), names.end(), "full") == names.end()) names.insert(names.begin(), "full");
    std::stable_partition(names.begin(), names.end(), [](const std::string& n) { return n == "full"; });
    for (const std::string& name : names) {
      PolicyOptions p;
      p.name = name;
      if (name == "full") {
        p.ratio = 1.0;
        jobs.emplace_back(p, "1.00");
        continue;
      }
      if (name == "pyramid" || name == "pyramid-expected") jobs.emplace_back(p, "paper");  // the paper's schedule
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
    Progress progress;
    progress.add((long long)jobs.size() * o.passages, double(o.prefill) + o.cont);
    progress.add((long long)jobs.size() * o.passkey_trials, double(o.prefill) + kLookupAnswerTokens);
    progress.start();
    std::vector<Row> rows;
    for (const auto& [p, budget] : jobs) {
      rows.push_back(evaluate(model, tok, texts, passages, o, p, budget, progress));
      rows.back().vs_full = compare(rows.back(), rows.front());
      const Row& r = rows.back();
      std::fprintf(stderr, "%-16s %-8s ratio %.4f  kv %.3f (end %.3f)  ppl %.4f  vs full %+.2f%% +- %.2f%%  lookup %.2f  (%.1f s)\n",
                   r.policy.c_str(), r.budget.c_str(), r.ratio, r.kv_prefill, r.kv_end, r.ppl, 100 * r.vs_full.mean,
                   100 * r.vs_full.se, r.passkey, r.seconds);
    }
    print_table(rows, o.passages);
    write_results(rows, passages, o);
    std::fprintf(stderr, "wrote %s.csv and %s.json\n", o.out.c_str(), o.out.c_str());
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "pyramid-eval: " << e.what() << "\n";
    return 1;
  }
}
