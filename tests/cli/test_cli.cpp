// The command lines of pyramid-generate and pyramid-eval: every bad command
// line is a clean error that names the flag and the value (issue 14, item 6).
//  - [parser]: options.hpp's parsers called directly with bad values;
//  - [fuzz]: random argument vectors, in process and through the built tools:
//    only clean errors (cli::UsageError / exit 1 or 2), never a crash;
//  - [tools]: the built tools run with bad command lines (exit code, message);
//  - [model]: huge sizes and a short happy path on the real model (skipped
//    with a warning when examples/fetch_model.sh has not run).
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "generate/options.hpp"

using namespace pyramidinfer;
using namespace pyramidinfer::llama;

namespace {

std::vector<const char*> argv_of(const std::vector<std::string>& args) {
  std::vector<const char*> v{"tool"};
  for (const auto& a : args) v.push_back(a.c_str());
  v.push_back(nullptr);
  return v;
}

GenerateOptions gen(const std::vector<std::string>& args, bool cuda = false) {
  const auto v = argv_of(args);
  return parse_generate_options(int(v.size()) - 1, v.data(), cuda);
}

EvalOptions eval(const std::vector<std::string>& args, bool cuda = false) {
  const auto v = argv_of(args);
  return parse_eval_options(int(v.size()) - 1, v.data(), cuda);
}

std::vector<std::string> labels(const std::vector<PolicyOptions>& v) {
  std::vector<std::string> out;
  for (const auto& p : v) out.push_back(p.label());
  return out;
}

/// The UsageError's text, or "" when parsing succeeded.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const cli::UsageError& e) {
    return e.what();
  }
  return "";
}

bool has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

std::string gen_error(const std::vector<std::string>& args, bool cuda = false) {
  return error_of([&] { gen(args, cuda); });
}
std::string eval_error(const std::vector<std::string>& args, bool cuda = false) {
  return error_of([&] { eval(args, cuda); });
}
std::string spec_error(const std::string& spec) {
  return error_of([&] { parse_policy_spec("--policies", spec); });
}

struct Exit {
  bool exited = false;  ///< false: killed by a signal
  int code = -1;
  std::string output;  ///< stdout and stderr together
};

/// Runs `exe args` in `cwd` with $PYRAMIDINFER_MODEL = model ("": unset).
Exit run_tool(const std::string& exe, const std::vector<std::string>& args, const std::string& model,
              const std::string& cwd = "") {
  int fds[2];
  REQUIRE(pipe(fds) == 0);
  const pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    dup2(fds[1], 1);
    dup2(fds[1], 2);
    close(fds[0]);
    close(fds[1]);
    if (!cwd.empty() && chdir(cwd.c_str()) != 0) _exit(127);
    if (model.empty())
      unsetenv("PYRAMIDINFER_MODEL");
    else
      setenv("PYRAMIDINFER_MODEL", model.c_str(), 1);
    std::vector<char*> v{const_cast<char*>(exe.c_str())};
    for (const auto& a : args) v.push_back(const_cast<char*>(a.c_str()));
    v.push_back(nullptr);
    execv(exe.c_str(), v.data());
    _exit(127);
  }
  close(fds[1]);
  Exit r;
  char buf[4096];
  for (ssize_t n; (n = read(fds[0], buf, sizeof buf)) > 0;) r.output.append(buf, std::size_t(n));
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  r.exited = WIFEXITED(status);
  r.code = r.exited ? WEXITSTATUS(status) : -WTERMSIG(status);
  return r;
}

const std::string kNoModel = "/nonexistent/pyramidinfer-cli-test/model.gguf";

std::string temp_dir() {
  char tmpl[] = "/tmp/pyramidinfer_cli_XXXXXX";
  const char* d = mkdtemp(tmpl);
  REQUIRE(d != nullptr);
  return d;
}

bool model_present() { return std::ifstream(default_model_path()).good(); }

}  // namespace

// ------------------------------------------------------------------ parser

TEST_CASE("unknown or mistyped flags are errors, never prompt text", "[parser]") {
  std::string e = gen_error({"--max-token", "2"});
  CHECK(has(e, "unknown option '--max-token'"));
  CHECK(has(e, "did you mean --max-tokens"));
  CHECK(has(gen_error({"-x", "hello"}), "'-x'"));
  CHECK(has(gen_error({"--policy=pyramid", "--rati", "0.5"}), "'--rati'"));
  CHECK(has(gen_error({"--raw=1"}), "--raw takes no value"));
  CHECK(has(eval_error({"--prefil", "64"}), "did you mean --prefill"));
  CHECK(has(eval_error({"stray"}), "unexpected argument 'stray'"));
  CHECK(has(eval_error({"--out"}), "missing value after --out"));
  CHECK(has(gen_error({"--model", "--raw"}), "missing value after --model"));
  CHECK(has(gen_error({"--max-tokens", "3", "--max-tokens", "4"}), "--max-tokens given more than once"));
  // After "--" everything is the prompt.
  CHECK(gen({"--max-tokens", "3", "--", "--max-token", "-5"}).prompt == "--max-token -5");
  CHECK(gen({"--max-tokens=7", "hello", "world"}).max_tokens == 7);
  CHECK(gen({"--max-tokens=7", "hello", "world"}).prompt == "hello world");
}

TEST_CASE("integers are whole decimal numbers in range", "[parser]") {
  for (const std::string bad : {"5x", "1e3", "0x10", "+5", " 5", "5 ", "", "-", "1.0", "0", "-1", "2147483648",
                                "99999999999999999999999", "nan", "\xff"}) {
    const std::string e = gen_error({"--max-tokens", bad});
    INFO(bad << ": " << e);
    CHECK(has(e, "--max-tokens '" + bad + "'"));
  }
  CHECK(has(gen_error({"--max-tokens", "5x"}), "not an integer"));
  CHECK(has(gen_error({"--max-tokens", "0"}), "[1, 2147483647]"));
  CHECK(gen({"--max-tokens", "2147483647"}).max_tokens == 2147483647);  // parses; the model's context decides
  for (const std::string flag : {"--prefill", "--continue", "--passages", "--passkey-trials"})
    for (const std::string bad : {"1e3", "12abc", "-1", "4294967296", "abc", ""}) {
      const std::string e = eval_error({flag, bad});
      INFO(flag << " " << bad << ": " << e);
      CHECK(has(e, flag + " '" + bad + "'"));
    }
  CHECK(has(eval_error({"--prefill", "15"}), "[16, 2147483647]"));
  CHECK(has(eval_error({"--passages", "1000001"}), "--passages '1000001'"));
  CHECK(eval({"--prefill", "2147483647"}).prefill == 2147483647);  // parses; the model's context decides
}

TEST_CASE("real numbers are finite, whole and in range", "[parser]") {
  for (const std::string bad : {"nan", "NaN", "inf", "-inf", "0.5x", "", ".", "e5", "0", "-0.1", "1.5", "1e999",
                                "0x0.8p0", " 0.5", "+0.5", "0,5"}) {
    const std::string e = gen_error({"--ratio", bad});
    INFO(bad << ": " << e);
    CHECK(has(e, "--ratio '" + bad + "'"));
  }
  CHECK(gen({"--ratio", "5e-1"}).policy.ratio == 0.5);
  CHECK(gen({"--ratio", "1"}).policy.ratio == 1.0);
  CHECK(has(gen_error({"--recent-ratio", "1"}), "must be in [0, 1)"));
  CHECK(gen({"--recent-ratio", "0"}).policy.recent_ratio == 0.0);
}

TEST_CASE("the prompt: none is the built-in example, empty is an error", "[parser]") {
  CHECK(gen({}).prompt.empty());  // the tool fills in the built-in example
  CHECK(has(gen_error({""}), "empty prompt"));
  CHECK(has(gen_error({"  ", "\t"}), "empty prompt"));
  CHECK(has(gen_error({"--raw", "--", ""}), "empty prompt"));
  CHECK(gen({"--", "-"}).prompt == "-");
}

TEST_CASE("a flag the policy or device ignores is rejected", "[parser]") {
  CHECK(has(gen_error({"--policy", "full", "--ratio", "0.5"}), "--ratio '0.5' does not apply"));
  CHECK(has(gen_error({"--ratio", "0.5", "--policy", "pyramid45"}), "pyramid45"));
  CHECK(has(gen_error({"--policy", "full", "--recent-ratio", "0.1"}), "--recent-ratio '0.1' does not apply"));
  CHECK(gen({"--policy", "h2o", "--ratio", "0.5"}).policy.ratio == 0.5);
  CHECK(has(gen_error({"--policy", "bogus"}), "--policy 'bogus': unknown policy"));
  CHECK(has(gen_error({"--device", "gpu"}), "--device 'gpu'"));
  CHECK(has(gen_error({"--device", "cuda"}, false), "cpu only"));
  CHECK(gen({"--device", "cuda", "--policy", "h2o"}, true).policy.name == "h2o");  // every policy runs on cuda
  CHECK(gen({"--device", "cuda", "--policy", "full"}, true).device == "cuda");
  CHECK(has(gen_error({"--model", ""}), "--model ''"));
}

TEST_CASE("pyramid-eval: fractions in (0, 1], non-empty lists of known policies", "[parser]") {
  for (const std::string bad : {"nan", "0", "2", "-0.5", "1.0001", "0.5x", "inf"}) {
    const std::string e = eval_error({"--fractions", "0.7," + bad});
    INFO(bad << ": " << e);
    CHECK(has(e, "--fractions '" + bad + "'"));
  }
  CHECK(has(eval_error({"--fractions", ""}), "--fractions '': empty list"));
  CHECK(has(eval_error({"--fractions", "0.5,,0.3"}), "empty item"));
  CHECK(has(eval_error({"--fractions", "0.5,"}), "empty item"));
  CHECK(eval({"--fractions", "1,0.25"}).fractions == std::vector<double>{1.0, 0.25});
  CHECK(has(eval_error({"--policies", ""}), "--policies '': empty list"));
  CHECK(has(eval_error({"--policies", ","}), "empty item"));
  CHECK(has(eval_error({"--policies", "full,bogus"}), "unknown policy 'bogus'"));
  CHECK(has(eval_error({"--policies", "full,full"}), "'full' twice"));
  CHECK(labels(eval({"--policies", "full,h2o"}).policies) == std::vector<std::string>{"full", "h2o"});
  CHECK(labels(eval({"--policies", "pyramid:start=4,pyramid"}).policies) ==
        std::vector<std::string>{"pyramid:start=4", "pyramid"});
  CHECK(has(eval_error({"--policies", "pyramid:start=4,pyramid:start=4"}), "'pyramid:start=4' twice"));
  CHECK(has(eval_error({"--device", "cuda"}), "cpu only"));
  CHECK(has(eval_error({"--device", "gpu"}, true), "--device 'gpu'"));
  CHECK(eval({"--device", "cuda"}, true).device == "cuda");
  CHECK(has(eval_error({"--out", ""}), "--out ''"));
  CHECK(has(eval_error({"--policies", "full,h2o", "--fractions", "1"}), "--policies 'h2o'"));
  CHECK(eval({"--policies", "full,pyramid,pyramid45", "--fractions", "1"}).fractions == std::vector<double>{1.0});
  CHECK(has(eval_error({"--passages", "0", "--passkey-trials", "0"}), "nothing to evaluate"));
  CHECK(eval({"--help"}).help);
}

TEST_CASE("policy specs: a name and key=value changes, each checked", "[parser]") {
  const PolicyOptions p = parse_policy_spec("--policy", "pyramid:start=6:select=head:score=expected:window=0.1:sinks=2:min=8:dw=1.5");
  CHECK(p.name == "pyramid");
  CHECK(p.label() == "pyramid:start=6:select=head:score=expected:window=0.1:sinks=2:min=8:dw=1.5");
  CHECK(p.tweaks.start == 6);
  CHECK(p.tweaks.select == "head");
  CHECK(p.tweaks.score == "expected");
  CHECK(p.recent_ratio == 0.1);
  CHECK(p.sinks == 2);
  CHECK(p.min_context == 8);
  CHECK(p.tweaks.dw == 1.5f);
  CHECK(parse_policy_spec("--policy", "snapkv").tweaks.text.empty());
  CHECK(has(spec_error("bogus:start=1"), "unknown policy 'bogus'"));
  CHECK(has(spec_error("full:start=1"), "'full' takes no changes"));
  CHECK(has(spec_error("pyramid45:dw=1"), "'pyramid45' takes no changes"));
  CHECK(has(spec_error("pyramid-late:start=3"), "'pyramid-late' takes no changes"));
  CHECK(has(spec_error("pyramid:"), "'' is not key=value"));
  CHECK(has(spec_error("pyramid:start"), "'start' is not key=value"));
  CHECK(has(spec_error("pyramid:start="), "'start=' is not key=value"));
  CHECK(has(spec_error("pyramid:start=1:start=2"), "'start' twice"));
  CHECK(has(spec_error("pyramid:shape=square"), "shape='square': one of cosine, linear, geometric, uniform"));
  CHECK(has(spec_error("pyramid:start=-1"), "--policies 'pyramid:start=-1' start '-1': out of range"));
  CHECK(has(spec_error("pyramid:window=1"), "window '1'"));
  CHECK(has(spec_error("pyramid:dw=nan"), "dw 'nan'"));
  CHECK(has(spec_error("pyramid:colour=red"), "unknown key 'colour'"));
  CHECK(gen({"--policy", "snapkv:mode=drop:shape=cosine", "--ratio", "0.5"}).policy.ratio == 0.5);
  CHECK(has(gen_error({"--policy", "h2o:select=all"}), "--policy 'h2o:select=all': select='all'"));
}

TEST_CASE("policy specs: fire=N is when the engine offers decode compression, not a compressor change", "[parser]") {
  const PolicyOptions p = parse_policy_spec("--policy", "pyramid:fire=16");
  CHECK(p.fire_every == 16);
  CHECK(p.tweaks.text.empty());  // the named compressor, not the recipe path
  CHECK(p.label() == "pyramid:fire=16");
  CHECK(parse_policy_spec("--policy", "pyramid:dw=1:fire=4").label() == "pyramid:dw=1:fire=4");
  CHECK(parse_policy_spec("--policy", "pyramid45:fire=8").fire_every == 8);  // takes fire, no other change
  CHECK(parse_policy_spec("--policy", "pyramid").fire_every == 1);
  CHECK(has(spec_error("full:fire=4"), "'full' compresses nothing"));
  CHECK(has(spec_error("pyramid45:fire=4:dw=1"), "'pyramid45' takes no changes but fire"));
  CHECK(has(spec_error("pyramid:fire=0"), "fire '0'"));
  CHECK(has(spec_error("pyramid:fire=65"), "fire '65'"));
  CHECK(has(spec_error("pyramid:fire=4:fire=8"), "'fire' twice"));
  // the rows are told apart, a repeat is refused, and the CUDA evaluator (every step) refuses them
  CHECK(labels(eval({"--policies", "full,pyramid,pyramid:fire=16"}).policies) ==
        std::vector<std::string>{"full", "pyramid", "pyramid:fire=16"});
  CHECK(has(eval_error({"--policies", "pyramid:fire=16,pyramid:fire=16"}), "twice"));
  CHECK(has(eval_error({"--policies", "full,pyramid:fire=16", "--device", "cuda"}, true), "--device cpu"));
  CHECK(has(gen_error({"--policy", "pyramid:fire=16", "--device", "cuda"}, true), "--device cpu"));
  CHECK(gen({"--policy", "pyramid:fire=16"}).policy.fire_every == 16);
}

// -------------------------------------------------------------------- fuzz

namespace {

const std::vector<std::string> kPieces = {
    "--model", "--policy", "--ratio", "--recent-ratio", "--max-tokens", "--device", "--raw", "--help", "-h",
    "--text", "--prefill", "--continue", "--passages", "--passkey-trials", "--policies", "--fractions", "--out",
    "--", "-", "--max-token", "--ratio=", "--prefill=", "--fractions=", "--policies=", "--raw=", "=", "---",
    "0", "1", "-1", "5x", "1e3", "0.5", "nan", "inf", "-inf", "2147483647", "2147483648", "-2147483648",
    "99999999999999999999", "1e999", "0x10", "", " ", ",", ",,", "1,0.5", "0,2", "full", "pyramid", "pyramid45",
    "h2o", "snapkv", "streaming", "pyramid-perhead", "full,pyramid", "cpu", "cuda", "gpu", "hello", "\xff\xfe",
    "pyramid:start=4", "snapkv:mode=drop:shape=cosine", ":", "pyramid:", "pyramid:start", "full:dw=1", "pyramid:x=1",
    "pyramid:fire=16", "pyramid45:fire=0", "full:fire=2",
    "/nonexistent/x", "out/x"};

std::string random_arg(std::mt19937& rng) {
  const std::string& a = kPieces[rng() % kPieces.size()];
  switch (rng() % 6) {
    case 0: {  // a random byte string
      std::string s(rng() % 6, ' ');
      for (auto& c : s) c = char(1 + rng() % 255);
      return s;
    }
    case 1:  // two pieces glued, e.g. "--ratio=0.5" or "0.55x"
      return a + kPieces[rng() % kPieces.size()];
    default:
      return a;
  }
}

std::vector<std::string> random_args(std::mt19937& rng) {
  std::vector<std::string> args(rng() % 7);
  for (auto& a : args) a = random_arg(rng);
  return args;
}

}  // namespace

TEST_CASE("fuzz: random argument vectors give options or a UsageError", "[fuzz]") {
  std::mt19937 rng(20261204);
  int accepted = 0, rejected = 0;
  for (int i = 0; i < 20000; ++i) {
    const std::vector<std::string> args = random_args(rng);
    const auto v = argv_of(args);
    try {
      if (i % 2)
        parse_eval_options(int(v.size()) - 1, v.data(), i % 4 == 1);
      else
        parse_generate_options(int(v.size()) - 1, v.data(), i % 4 == 0);
      ++accepted;
    } catch (const cli::UsageError& e) {
      ++rejected;
      REQUIRE(std::string(e.what()).size() > 0);
    } catch (const std::exception& e) {
      std::string line;
      for (const auto& a : args) line += "[" + a + "] ";
      FAIL("not a UsageError for " << line << ": " << e.what());
    }
  }
  CHECK(accepted > 100);
  CHECK(rejected > 1000);
}

TEST_CASE("fuzz: the tools exit cleanly on random command lines", "[fuzz]") {
  // No model: a command line that parses fails at the model (exit 1); one that
  // does not parses is a usage error (exit 2); --help exits 0. Never a signal.
  const std::string dir = temp_dir();
  std::mt19937 rng(4242);
  for (int i = 0; i < 300; ++i) {
    const std::vector<std::string> args = random_args(rng);
    const Exit r = run_tool(i % 2 ? PYRAMIDINFER_EVAL_EXE : PYRAMIDINFER_GENERATE_EXE, args, kNoModel, dir);
    std::string line;
    for (const auto& a : args) line += "[" + a + "] ";
    INFO((i % 2 ? "pyramid-eval " : "pyramid-generate ") << line << "\n" << r.output);
    REQUIRE(r.exited);
    REQUIRE((r.code == 0 || r.code == 1 || r.code == 2));
    if (r.code == 2) CHECK(has(r.output, "--help lists the options"));
  }
}

// ------------------------------------------------------------------- tools

TEST_CASE("pyramid-generate: bad command lines exit 2 naming the flag and value", "[tools]") {
  const struct {
    std::vector<std::string> args;
    std::string message;
  } cases[] = {
      {{"--max-token", "2"}, "unknown option '--max-token'"},
      {{"--max-tokens", "5x"}, "--max-tokens '5x'"},
      {{"--max-tokens", "1e3"}, "--max-tokens '1e3'"},
      {{"--max-tokens", "abc"}, "--max-tokens 'abc': not an integer"},
      {{"--ratio", "abc"}, "--ratio 'abc': not a number"},
      {{"--ratio", "nan"}, "--ratio 'nan'"},
      {{"--policy", "full", "--ratio", "0.5"}, "--ratio '0.5' does not apply"},
      {{""}, "empty prompt"},
      {{"--ratio"}, "missing value after --ratio"},
  };
  for (const auto& c : cases) {
    const Exit r = run_tool(PYRAMIDINFER_GENERATE_EXE, c.args, kNoModel);
    INFO(r.output);
    CHECK(r.exited);
    CHECK(r.code == 2);
    CHECK(has(r.output, c.message));
  }
  const Exit help = run_tool(PYRAMIDINFER_GENERATE_EXE, {"--help"}, kNoModel);
  CHECK(help.code == 0);
  CHECK(has(help.output, "usage: pyramid-generate"));
}

TEST_CASE("pyramid-eval: bad command lines exit 2, an unwritable --out fails up front", "[tools]") {
  const struct {
    std::vector<std::string> args;
    std::string message;
  } cases[] = {
      {{"--fractions", "nan"}, "--fractions 'nan'"},
      {{"--fractions", "0"}, "--fractions '0'"},
      {{"--fractions", "2"}, "--fractions '2'"},
      {{"--policies", ""}, "--policies '': empty list"},
      {{"--prefill", "5x"}, "--prefill '5x'"},
      {{"--prefill", "2147483648"}, "--prefill '2147483648': out of range"},
      {{"--bogus", "1"}, "unknown option '--bogus'"},
  };
  for (const auto& c : cases) {
    const Exit r = run_tool(PYRAMIDINFER_EVAL_EXE, c.args, kNoModel);
    INFO(r.output);
    CHECK(r.exited);
    CHECK(r.code == 2);
    CHECK(has(r.output, c.message));
  }
  const std::string dir = temp_dir();
  for (const std::string& prefix : {std::string("/nonexistent/dir/result"), dir + "/sub/none"}) {
    const Exit r = run_tool(PYRAMIDINFER_EVAL_EXE, {"--out", prefix}, kNoModel);
    INFO(r.output);
    CHECK(r.code == 1);
    CHECK(has(r.output, "--out: cannot write " + prefix + ".csv"));
    CHECK(!has(r.output, "wrote"));
  }
  // A read-only existing file is not truncated and is reported.
  const std::string ro = dir + "/ro";
  std::ofstream(ro + ".csv") << "keep\n";
  chmod((ro + ".csv").c_str(), 0444);
  if (access((ro + ".csv").c_str(), W_OK) != 0) {  // root can write anyway
    const Exit r = run_tool(PYRAMIDINFER_EVAL_EXE, {"--out", ro}, kNoModel);
    CHECK(r.code == 1);
    CHECK(has(r.output, "cannot write " + ro + ".csv"));
  }
  std::string kept;
  std::getline(std::ifstream(ro + ".csv"), kept);
  CHECK(kept == "keep");
  // A writable prefix is checked without leaving files behind (the model is missing here).
  const Exit r = run_tool(PYRAMIDINFER_EVAL_EXE, {"--out", dir + "/fresh"}, kNoModel);
  CHECK(r.code == 1);
  CHECK(!std::ifstream(dir + "/fresh.csv").good());
}

TEST_CASE("pyramid-serve-plan: bad command lines exit 2; a plan prints a JSON line per policy and mode", "[tools]") {
  const struct {
    std::vector<std::string> args;
    std::string message;
  } cases[] = {
      {{"--pages", "0"}, "--pages '0'"},
      {{"--ring-reserve", "5"}, "--ring-reserve 5: needs --ring-rows"},
      {{"--gemm-tflops", "nan"}, "--gemm-tflops 'nan'"},
      {{"--shape", "llama9"}, "--shape 'llama9'"},
      {{"--no-graph"}, "unknown option '--no-graph'"},
      {{"selfcheck"}, "'selfcheck'"},
  };
  for (const auto& c : cases) {
    const Exit r = run_tool(PYRAMIDINFER_SERVE_PLAN_EXE, c.args, kNoModel);
    INFO(r.output);
    CHECK(r.exited);
    CHECK(r.code == 2);
    CHECK(has(r.output, c.message));
  }
  const Exit bad_model = run_tool(PYRAMIDINFER_SERVE_PLAN_EXE, {"--model", kNoModel}, kNoModel);
  CHECK(bad_model.code == 1);
  CHECK(has(bad_model.output, kNoModel));
  const Exit r = run_tool(PYRAMIDINFER_SERVE_PLAN_EXE,
                          {"--shape", "tiny", "--policies", "full,pyramid45", "--requests", "24", "--max-seqs", "8",
                           "--pool-gb", "0.01", "--prompt-cap", "1024", "--mode", "both"},
                          kNoModel);
  INFO(r.output);
  REQUIRE(r.code == 0);
  int lines = 0;
  const std::string line_start = "{\"bench\":\"serve\",\"engine\":\"plan\"";
  for (std::size_t at = 0; (at = r.output.find(line_start, at)) != std::string::npos; ++at) ++lines;
  CHECK(lines == 4);  // two policies, saturation and Poisson
  CHECK(has(r.output, "\"admit_stops\":{\"queue_empty\":"));
  CHECK(has(r.output, "\"policy\":\"pyramid45\""));
}

// ------------------------------------------------------------------- model

TEST_CASE("huge sizes are clear errors on the real model; a short run works", "[model]") {
  if (!model_present()) {
    WARN("model not found at " << default_model_path() << " (run examples/fetch_model.sh): skipped");
    return;
  }
  const std::string model = default_model_path();
  Exit r = run_tool(PYRAMIDINFER_GENERATE_EXE, {"--max-tokens", "2147483647"}, model);
  INFO(r.output);
  CHECK(r.code == 2);
  CHECK(has(r.output, "--max-tokens '2147483647'"));
  CHECK(has(r.output, "context length"));

  const std::string dir = temp_dir();
  r = run_tool(PYRAMIDINFER_EVAL_EXE, {"--prefill", "2147483647", "--out", dir + "/x"}, model);
  INFO(r.output);
  CHECK(r.code == 1);
  CHECK(has(r.output, "--prefill 2147483647"));
  CHECK(has(r.output, "context length"));
  r = run_tool(PYRAMIDINFER_EVAL_EXE, {"--continue", "2147483647", "--out", dir + "/x"}, model);
  CHECK(r.code == 1);
  CHECK(has(r.output, "--continue 2147483647"));
  r = run_tool(PYRAMIDINFER_EVAL_EXE,
               {"--prefill", "16", "--passages", "0", "--passkey-trials", "1", "--policies", "full", "--out", dir + "/x"},
               model);
  CHECK(r.code == 1);
  CHECK(has(r.output, "too short for a passkey prompt"));

  r = run_tool(PYRAMIDINFER_GENERATE_EXE, {"--policy", "streaming", "--ratio", "0.5", "--max-tokens", "2", "Hello"},
               model);
  INFO(r.output);
  CHECK(r.code == 0);
  r = run_tool(PYRAMIDINFER_EVAL_EXE,
               {"--prefill", "64", "--continue", "4", "--passages", "1", "--passkey-trials", "1", "--policies",
                "full,h2o", "--fractions", "0.5", "--out", dir + "/ok"},
               model);
  INFO(r.output);
  CHECK(r.code == 0);
  CHECK(has(r.output, "[4/4 100%"));
  CHECK(has(r.output, "left]"));
  CHECK(has(r.output, "wrote " + dir + "/ok.csv"));
  CHECK(std::ifstream(dir + "/ok.json").good());
}
