// options.hpp - the command lines of pyramid-generate and pyramid-eval, parsed
// with cli.hpp's strict rules (see there: unknown flags, trailing junk, 1e3 as
// an integer, nan, out-of-range values and empty lists are all errors that
// name the flag and the value). tests/cli calls these parsers directly and
// runs the tools with bad command lines.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "generate/cli.hpp"
#include "generate/policies.hpp"

namespace pyramidinfer::llama {

/// $PYRAMIDINFER_MODEL, else the model examples/fetch_model.sh fetches.
inline std::string default_model_path() {
  const char* env = std::getenv("PYRAMIDINFER_MODEL");
  if (env && *env) return env;
  return std::string(PYRAMIDINFER_REPO_ROOT) + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

inline std::string policy_list() {
  std::string s;
  for (const auto& n : policy_names()) s += (s.empty() ? "" : ", ") + n;
  return s;
}

/// Why `--ratio` / `--recent-ratio` mean nothing for a policy ("" when they apply).
inline std::string ratio_ignored_because(const std::string& policy) {
  if (policy == "full") return "policy 'full' keeps every token and has no ratio";
  if (policy == "pyramid45" || policy == "pyramid-late")
    return "policy '" + policy + "' uses fixed settings (policies.hpp)";
  return "";
}

inline constexpr std::int64_t kIntMax = std::numeric_limits<int>::max();

// ---------------------------------------------------------------- generate

struct GenerateOptions {
  std::string model = default_model_path();
  PolicyOptions policy;
  int max_tokens = 96;
  std::string device = "cpu";
  bool raw = false;
  bool help = false;
  /// Empty when no prompt was given: the tool then uses its built-in example.
  std::string prompt;
};

inline std::string generate_usage() {
  return "usage: pyramid-generate [--model PATH] [--policy SPEC] [--ratio R] [--recent-ratio R]\n"
         "                        [--max-tokens N] [--device cpu|cuda] [--raw] [--] PROMPT...\n"
         "  --model PATH        GGUF file (default $PYRAMIDINFER_MODEL, then models/SmolLM2-135M-Instruct.Q4_1.gguf)\n"
         "  --policy SPEC       a policy name, one of: " +
         policy_list() +
         " (default pyramid),\n"
         "                      optionally changed: NAME:key=value:... (" + policy_spec_keys() + ")\n"
         "  --ratio R           in (0, 1]: the pyramid's final ratio, or the share each layer keeps (layer-local\n"
         "                      policies); not for full, pyramid45 or pyramid-late\n"
         "  --recent-ratio R    in [0, 1): the recent window's share of the prompt; not for full, pyramid45 or\n"
         "                      pyramid-late\n"
         "  --max-tokens N      tokens to generate, >= 1 (prompt + N must fit the model's context; default 96)\n"
         "  --device cpu|cuda   cuda only in CUDA builds\n"
         "  --raw               no chat template: the prompt is the model's input as is\n"
         "  PROMPT...           the words are joined with spaces; use -- before a prompt that starts with '-'.\n"
         "                      With no prompt, a question about the opening of Moby-Dick (about 700 tokens).\n"
         "Integers are whole decimal numbers (no 1e3, no 5x); flags may be written --flag=value.\n"
         "policies: " +
         policy_help() + "\n";
}

/// Parses pyramid-generate's command line; throws cli::UsageError.
inline GenerateOptions parse_generate_options(int argc, const char* const* argv, bool cuda_built) {
  using namespace cli;
  GenerateOptions o;
  std::string ratio_text, recent_text, spec = o.policy.name;
  bool ratio_given = false, recent_given = false;
  Parser p("pyramid-generate");
  p.value("--model",
          [&](const std::string& v) {
            if (v.empty()) throw UsageError("--model '': empty path");
            o.model = v;
          })
      .value("--policy", [&](const std::string& v) { spec = v; })
      .value("--ratio", [&](const std::string& v) { ratio_text = v, ratio_given = true; })
      .value("--recent-ratio", [&](const std::string& v) { recent_text = v, recent_given = true; })
      .value("--max-tokens", [&](const std::string& v) { o.max_tokens = int(parse_int("--max-tokens", v, 1, kIntMax)); })
      .value("--device", [&](const std::string& v) { o.device = v; })
      .toggle("--raw", [&] { o.raw = true; })
      .toggle("--help", [&] { o.help = true; })
      .toggle("-h", [&] { o.help = true; });
  const std::vector<std::string> words = p.parse(argc, argv, /*positional=*/true);
  if (o.help) return o;

  o.policy = parse_policy_spec("--policy", spec);
  if (ratio_given) o.policy.ratio = parse_real("--ratio", ratio_text, 0.0, 1.0, Bounds::open_low);
  if (recent_given) o.policy.recent_ratio = parse_real("--recent-ratio", recent_text, 0.0, 1.0, Bounds::open_high);
  if (o.device != "cpu" && o.device != "cuda") throw UsageError("--device " + in_quotes(o.device) + ": cpu or cuda");
  if (o.device == "cuda" && !cuda_built)
    throw UsageError("--device 'cuda': this build runs on cpu only (configure with CUDA for cuda)");
  if (o.device == "cuda" && o.policy.fire_every != 1)
    throw UsageError("--policy " + in_quotes(o.policy.label()) + ": fire=N runs with --device cpu");
  // Every named policy has device hooks (policy/device_hooks.cuh): --device cuda runs them all
  // (examples/llama_cuda/policy_engine.cuh), so the policy needs no check here beyond is_policy.
  const std::string why = ratio_ignored_because(o.policy.name);
  if (ratio_given && !why.empty()) throw UsageError("--ratio " + in_quotes(ratio_text) + " does not apply: " + why);
  if (recent_given && !why.empty())
    throw UsageError("--recent-ratio " + in_quotes(recent_text) + " does not apply: " + why);

  if (!words.empty()) {
    for (const auto& w : words) o.prompt += (o.prompt.empty() ? "" : " ") + w;
    if (o.prompt.find_first_not_of(" \t\r\n\f\v") == std::string::npos)
      throw UsageError("empty prompt " + in_quotes(o.prompt) +
                       ": give some text, or no prompt at all for the built-in example");
  }
  return o;
}

// -------------------------------------------------------------------- eval

/// The evaluation texts (examples/data/README.md): four public-domain
/// novels, none of them the Moby-Dick chapters 1-3 the quality tests use.
inline std::vector<std::string> default_eval_texts() {
  const std::string dir = std::string(PYRAMIDINFER_REPO_ROOT) + "/examples/data/";
  return {dir + "moby_dick_from_ch4.txt", dir + "pride_and_prejudice_from_ch1.txt", dir + "persuasion_from_ch1.txt",
          dir + "emma_from_ch1.txt"};
}

/// Every named policy, unchanged.
inline std::vector<PolicyOptions> default_policies() {
  std::vector<PolicyOptions> out;
  for (const std::string& name : policy_names()) out.push_back(parse_policy_spec("policy", name));
  return out;
}

struct EvalOptions {
  std::string model = default_model_path();
  std::vector<std::string> texts = default_eval_texts();
  int prefill = 1024, cont = 128, passages = 24, passkey_trials = 10;
  std::vector<PolicyOptions> policies = default_policies();
  std::string device = "cpu";
  std::vector<double> fractions = {1.0, 0.7, 0.5, 0.3};
  std::string out = "pyramid_eval";
  bool help = false;
};

/// Upper bound of --passages and --passkey-trials.
inline constexpr std::int64_t kMaxRepeats = 1000000;

inline std::string eval_usage() {
  return "usage: pyramid-eval [--model PATH] [--text FILE,...] [--prefill N] [--continue M]\n"
         "                    [--passages P] [--passkey-trials K] [--policies a,b,...]\n"
         "                    [--fractions 1,0.7,...] [--device cpu|cuda] [--out PREFIX]\n"
         "  --text FILE,...     texts to take passages from (default: the four novels in examples/data)\n"
         "  --prefill N         prompt tokens, >= 16 (default 1024; 1024 and 4096 are the usual settings)\n"
         "  --continue M        teacher-forced tokens scored after each prompt, >= 1 (default 128);\n"
         "                      the model's context must hold N + M\n"
         "  --passages P        perplexity passages, 0.." +
         std::to_string(kMaxRepeats) +
         " (default 24): passage i is the next unused\n"
         "                      N + M tokens of text i mod (number of texts); the texts must be long enough\n"
         "  --passkey-trials K  key-value lookup prompts, 0.." +
         std::to_string(kMaxRepeats) +
         " (default 10): a '[key: value]' line in N tokens of\n"
         "                      text, asked for at the end, its depth cycling over 5% .. 95%\n"
         "  --policies LIST     comma-separated policy specs: a name, one of " +
         policy_list() +
         ",\n"
         "                      optionally changed: NAME:key=value:... (" + policy_spec_keys() + ")\n"
         "                      (full is always run: every policy is compared with it passage by passage)\n"
         "  --fractions LIST    KV budgets, each in (0, 1] (1: the full cache only; default 1,0.7,0.5,0.3)\n"
         "  --device cpu|cuda   cuda (CUDA builds only) runs all passages of a policy as one batch\n"
         "  --out PREFIX        writes PREFIX.csv and PREFIX.json (default pyramid_eval)\n"
         "Integers are whole decimal numbers (no 1e3, no 5x); flags may be written --flag=value.\n";
}

/// Policies that have a row of their own besides the --fractions sweep (the
/// paper's settings, or fixed ones), so they run even with --fractions 1.
inline bool has_unswept_row(const PolicyOptions& p) {
  if (!p.tweaks.text.empty()) return false;
  return p.name == "full" || p.name == "pyramid" || p.name == "pyramid45" || p.name == "pyramid-late" ||
         p.name == "pyramid-expected";
}

/// Parses pyramid-eval's command line; throws cli::UsageError.
inline EvalOptions parse_eval_options(int argc, const char* const* argv, bool cuda_built) {
  using namespace cli;
  EvalOptions o;
  Parser p("pyramid-eval");
  const auto path = [](const char* flag, std::string& dst) {
    return [flag, &dst](const std::string& v) {
      if (v.empty()) throw UsageError(std::string(flag) + " '': empty path");
      dst = v;
    };
  };
  p.value("--model", path("--model", o.model))
      .value("--text",
             [&](const std::string& v) {
               o.texts = parse_list("--text", v);
               for (std::size_t i = 0; i < o.texts.size(); ++i)
                 for (std::size_t j = 0; j < i; ++j)
                   if (o.texts[j] == o.texts[i])
                     throw UsageError("--text " + in_quotes(v) + ": " + in_quotes(o.texts[i]) + " twice");
             })
      .value("--out", path("--out", o.out))
      .value("--device",
             [&](const std::string& v) {
               if (v != "cpu" && v != "cuda") throw UsageError("--device " + in_quotes(v) + ": cpu or cuda");
               if (v == "cuda" && !cuda_built)
                 throw UsageError("--device 'cuda': this build runs on cpu only (configure with CUDA for cuda)");
               o.device = v;
             })
      .value("--prefill", [&](const std::string& v) { o.prefill = int(parse_int("--prefill", v, 16, kIntMax)); })
      .value("--continue", [&](const std::string& v) { o.cont = int(parse_int("--continue", v, 1, kIntMax)); })
      .value("--passages",
             [&](const std::string& v) { o.passages = int(parse_int("--passages", v, 0, kMaxRepeats)); })
      .value("--passkey-trials",
             [&](const std::string& v) { o.passkey_trials = int(parse_int("--passkey-trials", v, 0, kMaxRepeats)); })
      .value("--policies",
             [&](const std::string& v) {
               o.policies.clear();
               for (const std::string& spec : parse_list("--policies", v)) {
                 const PolicyOptions parsed = parse_policy_spec("--policies", spec);
                 for (const PolicyOptions& p : o.policies)
                   if (p.label() == parsed.label())
                     throw UsageError("--policies " + in_quotes(v) + ": " + in_quotes(spec) + " twice");
                 o.policies.push_back(parsed);
               }
             })
      .value("--fractions",
             [&](const std::string& v) {
               o.fractions.clear();
               for (const auto& f : parse_list("--fractions", v))
                 o.fractions.push_back(parse_real("--fractions", f, 0.0, 1.0, Bounds::open_low));
             })
      .toggle("--help", [&] { o.help = true; })
      .toggle("-h", [&] { o.help = true; });
  p.parse(argc, argv, /*positional=*/false);
  if (o.help) return o;
  // Budget-swept policies get one row per fraction below 1: with none they
  // would be dropped without a word.
  bool below_one = false;
  for (double f : o.fractions) below_one = below_one || f < 1.0;
  for (const auto& p : o.policies)
    if (!below_one && !has_unswept_row(p))
      throw UsageError("--policies " + in_quotes(p.label()) +
                       ": this policy runs at the --fractions below 1 only, and there are none; add one (e.g. "
                       "--fractions 1,0.5)");
  if (o.passages == 0 && o.passkey_trials == 0)
    throw UsageError("--passages 0 and --passkey-trials 0: nothing to evaluate");
  if (o.device == "cuda")
    for (const auto& p : o.policies)
      if (p.fire_every != 1)
        throw UsageError("--policies " + in_quotes(p.label()) +
                         ": fire=N runs with --device cpu (the CUDA evaluator offers decode compression every step)");
  return o;
}

}  // namespace pyramidinfer::llama
