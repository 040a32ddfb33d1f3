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
#include <memory>
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
#ifdef PYRAMIDINFER_HAVE_CUDA_ENGINE
#include "llama_cuda/cuda_generate.hpp"
#endif

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
  double ratio = 1, kv_prefill = 0, kv_end = 0, nll = 0, ppl = 0, passkey = 0, seconds = 0, compress_seconds = 0;
  double prefill_flops = 1;  ///< share of a full prefill's FLOPs (prefill_flops_share)
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
  void step(double tokens, const std::string& what) { steps(1, tokens, what); }
  /// `count` steps of `tokens` each done at once (a batch).
  void steps(long long count, double tokens, const std::string& what) {
    done_steps_ += count;
    done_tokens_ += double(count) * tokens;
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

/// The lookup's answer (greedy tokens) begins with the value.
bool answer_is(const Tokenizer& tok, const std::vector<std::int32_t>& answer, const std::string& value) {
  std::string text = tok.decode(answer);
  text.erase(0, text.find_first_not_of(" \t\n"));
  const std::size_t end = text.find_first_not_of("abcdefghijklmnopqrstuvwxyz");
  return text.substr(0, end) == value;
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
  return answer_is(tok, answer, prompt.value);
}

// --------------------------------------------------------------------- runs

/// Share of a full prefill's FLOPs the policy spends: layer l computes its
/// |T_l| rows (projections, MLP) and causal attention over them; token
/// dropping shrinks T_l, layer-local policies compute every token. From the
/// planner's trace; per-head dropping computes the union of the heads'
/// tokens, at least the trace's count.
template <class Compressor>
double prefill_flops_share(const LlamaConfig& c, const Compressor& pc, int n) {
  const double d = double(c.dim), qd = double(c.n_heads * c.head_dim), kvd = double(c.n_kv_heads * c.head_dim);
  const double per_row = 2.0 * (d * (qd + 2 * kvd) + qd * d + 3.0 * d * double(c.ffn_dim));
  const auto flops = [&](double t) { return t * per_row + 2.0 * t * t * qd; };  // causal: half of 4 t^2 qd
  const bool drop = pc.config().prefill_mode == PrefillMode::drop_tokens;
  const LayerTrace trace = pc.trace(n, 0);
  double spent = 0;
  for (int held : trace.prefill_len) spent += flops(drop ? double(held) : double(n));
  return spent / (double(trace.prefill_len.size()) * flops(double(n)));
}

/// The tokens of passage i: n + m from its text.
std::vector<std::int32_t> passage_tokens(const std::vector<std::vector<std::int32_t>>& texts, const Passage& p,
                                         const Options& o) {
  const std::vector<std::int32_t>& text = texts[std::size_t(p.text)];
  return {text.begin() + std::ptrdiff_t(p.begin),
          text.begin() + std::ptrdiff_t(p.begin + std::size_t(o.prefill) + std::size_t(o.cont))};
}

/// What a policy did on every passage and lookup prompt, in order.
struct PolicyOutcome {
  std::vector<double> nll_sum, kv_prefill, kv_end;
  std::vector<Lookup> lookups;
  double compress_seconds = 0;
};

PolicyOutcome run_cpu(const Model& model, const Tokenizer& tok, const std::vector<std::vector<std::int32_t>>& texts,
                      const std::vector<Passage>& passages, const Options& o, const PolicyOptions& policy,
                      const std::string& budget, Progress& progress) {
  PolicyOutcome out;
  const LlamaConfig& c = model.config();
  const std::size_t full_slots = std::size_t(c.n_layers) * c.n_kv_heads * std::size_t(o.prefill);
  with_policy(c, policy, [&](auto pc) {
    PyramidEngine<decltype(pc)> engine(model, pc);
    double nll = 0;
    for (std::size_t i = 0; i < passages.size(); ++i) {
      double kvp = 0, kve = 0;
      engine.set_fire_schedule(policy.fire_every, int(i % std::size_t(policy.fire_every)));  // phases spread over passages
      const double sum =
          continuation_nll(engine, passage_tokens(texts, passages[i], o), o.prefill, o.cont, kvp, kve, full_slots);
      out.compress_seconds += engine.compression_seconds();  // each prefill restarts the engine's count
      out.nll_sum.push_back(sum), out.kv_prefill.push_back(kvp), out.kv_end.push_back(kve);
      nll += sum;
      char what[200];
      std::snprintf(what, sizeof what, "%s %s passage %zu/%zu: ppl %.3f (so far %.3f)", policy.label().c_str(),
                    budget.c_str(), i + 1, passages.size(), std::exp(sum / o.cont),
                    std::exp(nll / (double(i + 1) * o.cont)));
      progress.step(double(o.prefill) + o.cont, what);
    }
    for (int k = 0; k < o.passkey_trials; ++k) {
      const LookupPrompt prompt = lookup_prompt(tok, texts, o.prefill, k);
      engine.set_fire_schedule(policy.fire_every, k % policy.fire_every);
      const bool ok = lookup_found(engine, tok, prompt);
      out.compress_seconds += engine.compression_seconds();
      out.lookups.push_back({prompt.depth, ok});
      char what[200];
      std::snprintf(what, sizeof what, "%s %s lookup %d/%d (depth %.2f): %s", policy.label().c_str(), budget.c_str(),
                    k + 1, o.passkey_trials, prompt.depth, ok ? "found" : "missed");
      progress.step(double(o.prefill) + kLookupAnswerTokens, what);
    }
  });
  return out;
}

#ifdef PYRAMIDINFER_HAVE_CUDA_ENGINE
/// The CUDA engine runs every passage of a policy as one batch, then every
/// lookup prompt as another. Compression is not timed there (0).
PolicyOutcome run_cuda(llama_cuda::Evaluator& ev, const Tokenizer& tok,
                       const std::vector<std::vector<std::int32_t>>& texts, const std::vector<Passage>& passages,
                       const Options& o, const PolicyOptions& policy, const std::string& budget, Progress& progress) {
  PolicyOutcome out;
  if (!passages.empty()) {
    std::vector<std::vector<std::int32_t>> seqs;
    for (const Passage& p : passages) seqs.push_back(passage_tokens(texts, p, o));
    const llama_cuda::Evaluator::Continuation r = ev.continuation(policy, seqs, o.prefill, o.cont);
    out.nll_sum = r.nll, out.kv_prefill = r.kv_prefill, out.kv_end = r.kv_end;
    progress.steps((long long)passages.size(), double(o.prefill) + o.cont,
                   policy.label() + " " + budget + ": " + std::to_string(passages.size()) + " passages (one batch)");
  }
  if (o.passkey_trials > 0) {
    std::vector<LookupPrompt> prompts;
    std::vector<std::vector<std::int32_t>> tokens;
    for (int k = 0; k < o.passkey_trials; ++k) {
      prompts.push_back(lookup_prompt(tok, texts, o.prefill, k));
      tokens.push_back(prompts.back().tokens);
    }
    const auto answers = ev.greedy(policy, tokens, kLookupAnswerTokens);
    for (int k = 0; k < o.passkey_trials; ++k)
      out.lookups.push_back({prompts[std::size_t(k)].depth,
                             answer_is(tok, answers[std::size_t(k)], prompts[std::size_t(k)].value)});
    progress.steps(o.passkey_trials, double(o.prefill) + kLookupAnswerTokens,
                   policy.label() + " " + budget + ": " + std::to_string(o.passkey_trials) + " lookups (one batch)");
  }
  return out;
}
#endif

Row finish_row(const PolicyOutcome& r, const Options& o, const PolicyOptions& policy, const std::string& budget,
               double flops_share, double seconds) {
  Row row{policy.label(), budget, policy.ratio};
  const double P = double(r.nll_sum.size());
  for (double sum : r.nll_sum) row.passage_nll.push_back(sum / o.cont), row.nll += sum / (P * o.cont);
  for (double x : r.kv_prefill) row.kv_prefill += P > 0 ? x / P : 0.0;
  for (double x : r.kv_end) row.kv_end += P > 0 ? x / P : 0.0;
  row.ppl = std::exp(row.nll);
  row.lookups = r.lookups;
  int found = 0;
  for (const Lookup& l : r.lookups) found += l.found;
  row.passkey = r.lookups.empty() ? 0.0 : double(found) / double(r.lookups.size());
  row.prefill_flops = flops_share;
  row.compress_seconds = r.compress_seconds;
  row.seconds = seconds;
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
         "ppl_change_pooled,wins,losses,ties,passkey_accuracy,prefill_flops,seconds,compression_seconds\n";
  json << "{\"prefill\": " << o.prefill << ", \"continue\": " << o.cont << ", \"passkey_trials\": " << o.passkey_trials
       << ", \"device\": " << json_string(o.device)
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
        << p.ties << "," << r.passkey << "," << r.prefill_flops << "," << r.seconds << "," << r.compress_seconds << "\n";
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
         << ", \"prefill_flops\": " << r.prefill_flops << ",\n   \"seconds\": " << r.seconds << ", \"compression_seconds\": " << r.compress_seconds << "}"
         << (i + 1 < rows.size() ? "," : "") << "\n";
  }
  json << "]}\n";
  csv.close();
  json.close();
  if (!csv) throw std::runtime_error("--out: could not write " + o.out + ".csv");
  if (!json) throw std::runtime_error("--out: could not write " + o.out + ".json");
}

void print_table(const std::vector<Row>& rows, int passages) {
  int w = 17;
  for (const Row& r : rows) w = std::max(w, int(r.policy.size()) + 1);
  std::fprintf(stderr, "\n%-*s %-7s %6s %6s %6s %9s  %-22s %-9s %7s\n", w, "policy", "budget", "kv", "kv_end", "flops",
               "ppl", "vs full: mean +- se", "W/L/T", "lookup");
  for (const Row& r : rows) {
    char change[48] = "-";
    if (passages > 0)
      std::snprintf(change, sizeof change, "%+7.2f%% +- %5.2f%%", 100 * r.vs_full.mean, 100 * r.vs_full.se);
    char wlt[32];
    std::snprintf(wlt, sizeof wlt, "%d/%d/%d", r.vs_full.wins, r.vs_full.losses, r.vs_full.ties);
    std::fprintf(stderr, "%-*s %-7s %6.3f %6.3f %6.3f %9.4f  %-22s %-9s %6.0f%%\n", w, r.policy.c_str(),
                 r.budget.c_str(), r.kv_prefill, r.kv_end, r.prefill_flops, r.ppl, change, wlt, 100 * r.passkey);
  }
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  try {
#ifdef PYRAMIDINFER_HAVE_CUDA_ENGINE
    o = parse_eval_options(argc, argv, true);
#else
    o = parse_eval_options(argc, argv, false);
#endif
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
    std::vector<PolicyOptions> specs = o.policies;
    const auto is_full = [](const PolicyOptions& p) { return p.name == "full"; };
    if (std::none_of(specs.begin(), specs.end(), is_full)) specs.insert(specs.begin(), parse_policy_spec("policy", "full"));
    std::stable_partition(specs.begin(), specs.end(), is_full);
    for (PolicyOptions p : specs) {
      if (p.name == "full") {
        p.ratio = 1.0;
        jobs.emplace_back(p, "1.00");
        continue;
      }
      if (p.name == "pyramid45" || p.name == "pyramid-late") {  // fixed settings (policies.hpp): no budget sweep
        p.ratio = p.name == "pyramid45" ? Pyramid45::final_ratio : PyramidLate::final_ratio;
        jobs.emplace_back(p, p.name == "pyramid45" ? "plan45" : "preset");
        continue;
      }
      if (has_unswept_row(p)) jobs.emplace_back(p, "paper");  // the paper's schedule
      for (double f : o.fractions) {
        if (f >= 1.0) continue;  // the full cache is its own row
        p.ratio = ratio_for_fraction(model.config(), p, o.prefill, f);
        char budget[16];
        std::snprintf(budget, sizeof budget, "%.2f", f);
        jobs.emplace_back(p, budget);
      }
    }
#ifdef PYRAMIDINFER_HAVE_CUDA_ENGINE
    std::unique_ptr<llama_cuda::Evaluator> gpu;
    if (o.device == "cuda") {
      gpu = std::make_unique<llama_cuda::Evaluator>(o.model);
      std::fprintf(stderr, "device: %s (CUDA engine, fp16)\n", gpu->device().c_str());
    }
#endif
    Progress progress;
    progress.add((long long)jobs.size() * o.passages, double(o.prefill) + o.cont);
    progress.add((long long)jobs.size() * o.passkey_trials, double(o.prefill) + kLookupAnswerTokens);
    progress.start();
    std::vector<Row> rows;
    std::vector<std::string> failed;
    for (const auto& [p, budget] : jobs) {
      const auto t0 = std::chrono::steady_clock::now();
      PolicyOutcome r;
      // A policy that fails (e.g. a cache that refused work) is reported and
      // skipped; the full cache, which every row is compared with, may not fail.
      try {
#ifdef PYRAMIDINFER_HAVE_CUDA_ENGINE
        if (gpu) r = run_cuda(*gpu, tok, texts, passages, o, p, budget, progress);
#endif
        if (o.device == "cpu") r = run_cpu(model, tok, texts, passages, o, p, budget, progress);
      } catch (const std::exception& e) {
        if (rows.empty()) throw;
        failed.push_back(p.label() + " " + budget + ": " + e.what());
        std::fprintf(stderr, "FAILED %s\n", failed.back().c_str());
        continue;
      }
      double flops = 1;
      with_policy(model.config(), p, [&](const auto& pc) { flops = prefill_flops_share(model.config(), pc, o.prefill); });
      rows.push_back(finish_row(r, o, p, budget, flops,
                                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()));
      rows.back().vs_full = compare(rows.back(), rows.front());
      const Row& w = rows.back();
      std::fprintf(stderr, "%-16s %-8s ratio %.4f  kv %.3f (end %.3f)  flops %.3f  ppl %.4f  vs full %+.2f%% +- %.2f%%  lookup %.2f  (%.1f s)\n",
                   w.policy.c_str(), w.budget.c_str(), w.ratio, w.kv_prefill, w.kv_end, w.prefill_flops, w.ppl,
                   100 * w.vs_full.mean, 100 * w.vs_full.se, w.passkey, w.seconds);
    }
    print_table(rows, o.passages);
    write_results(rows, passages, o);
    std::fprintf(stderr, "wrote %s.csv and %s.json\n", o.out.c_str(), o.out.c_str());
    for (const std::string& f : failed) std::fprintf(stderr, "FAILED %s\n", f.c_str());
    return failed.empty() ? 0 : 1;
  } catch (const std::exception& e) {
    std::cerr << "pyramid-eval: " << e.what() << "\n";
    return 1;
  }
}
