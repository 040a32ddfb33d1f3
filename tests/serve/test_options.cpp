// serve's command line ([serve][options]): defaults, values, and bad input
// named in the error.
#include <catch2/catch.hpp>

#include <algorithm>
#include <string>
#include <vector>

#include "serve/serve_options.hpp"
#include "command_line.hpp"

using namespace pyramidinfer;
using namespace pyramidinfer::serve;

namespace {
ServeOptions parse(std::vector<std::string> args) { return test::parse_args(parse_serve_options, std::move(args)); }
std::string error_of(std::vector<std::string> args) { return test::usage_error(parse_serve_options, std::move(args)); }
}  // namespace

TEST_CASE("serve options: defaults and values", "[serve][options]") {
  const ServeOptions d = parse({});
  CHECK(d.shape == "llama2-7b");
  CHECK(d.policies == std::vector<std::string>{"full", "pyramid", "pyramid45", "snapkv"});
  CHECK(d.mode == "both");
  CHECK(d.load == 0.7);
  CHECK(d.match_budget == "pyramid45");
  CHECK(!d.selfcheck);
  CHECK(parse({"--match-budget", "none"}).match_budget.empty());
  CHECK(parse({"--match-budget", "pyramid"}).match_budget == "pyramid");
  const ServeOptions o = parse({"--shape", "tiny", "--policies", "h2o,streaming", "--requests=12", "--prompt-median",
                                "2048", "--mode", "poisson", "--rate", "1.5", "--pool-gb", "0.5", "--page-size", "64",
                                "--no-graph", "--steps-out", "s.jsonl"});
  CHECK(o.shape == "tiny");
  CHECK(o.policies == std::vector<std::string>{"h2o", "streaming"});
  CHECK(o.workload.requests == 12);
  CHECK(o.workload.prompt_median == 2048);
  CHECK(o.rate == 1.5);
  CHECK(o.pool_gb == 0.5);
  CHECK(o.page_size == 64);
  CHECK(!o.graph);
  CHECK(o.steps_out == "s.jsonl");
  CHECK(d.model.empty());
  CHECK(parse({"--model", "models/m.gguf"}).model == "models/m.gguf");
  CHECK(parse({"selfcheck"}).selfcheck);
}

TEST_CASE("serve options: bad input names the flag and the value", "[serve][options]") {
  CHECK_THAT(error_of({"--shape", "llama9"}), Catch::Contains("--shape 'llama9'"));
  CHECK_THAT(error_of({"--policies", "full,bogus"}), Catch::Contains("'bogus'"));
  CHECK_THAT(error_of({"--requests", "0"}), Catch::Contains("--requests '0'"));
  CHECK_THAT(error_of({"--requests", "5x"}), Catch::Contains("not an integer"));
  CHECK_THAT(error_of({"--mode", "fast"}), Catch::Contains("--mode 'fast'"));
  CHECK_THAT(error_of({"--match-budget", "snapkv"}), Catch::Contains("--match-budget 'snapkv'"));
  CHECK_THAT(error_of({"--match-budget", "pyramid9"}), Catch::Contains("--match-budget 'pyramid9'"));
  CHECK_THAT(error_of({"--rate", "2"}), Catch::Contains("needs --mode poisson"));
  CHECK_THAT(error_of({"--page-size", "24"}), Catch::Contains("power of two"));
  CHECK_THAT(error_of({"--pool-gb", "0"}), Catch::Contains("--pool-gb '0'"));
  CHECK_THAT(error_of({"--pool-gb", "2", "--ring-gb", "2"}), Catch::Contains("--ring-gb 2.000000: must be below"));
  CHECK_THAT(error_of({"--ring-gb", "41"}), Catch::Contains("--pool-gb 40.000000"));
  CHECK(parse({"--pool-gb", "2", "--ring-gb", "0.5"}).ring_gb == 0.5);
  CHECK_THAT(error_of({"--output-min", "100", "--output-max", "50"}), Catch::Contains("--output-max 50"));
  CHECK_THAT(error_of({"--prompt-cap", "8"}), Catch::Contains("--prompt-cap 8"));
  CHECK_THAT(error_of({"--bogus"}), Catch::Contains("unknown option '--bogus'"));
  CHECK_THAT(error_of({"run"}), Catch::Contains("unexpected argument 'run'"));
}

TEST_CASE("serve options: --dump-requests writes the workload's requests", "[serve][options]") {
  CHECK(parse({}).dump_requests.empty());
  const ServeOptions o = parse({"--requests", "5", "--prompt-median", "2048", "--seed", "3", "--dump-requests", "r.jsonl"});
  CHECK(o.dump_requests == "r.jsonl");
  CHECK(parse({"--dump-requests", "-"}).dump_requests == "-");
  // "" would read as "not given" and start the GPU run instead.
  CHECK_THAT(error_of({"--dump-requests="}), Catch::Contains("--dump-requests '': needs a file name"));
  CHECK_THAT(error_of({"--dump-requests", "r.jsonl", "selfcheck"}), Catch::Contains("does not go with selfcheck"));
  // The lines: the options, then exactly make_workload's requests (the saturation list).
  const std::string text = workload_json_lines(o.workload);
  CHECK(text.rfind("{\"bench\":\"serve-workload\",\"seed\":3,\"requests\":5,\"prompt_median\":2048,"
                   "\"prompt_sigma\":0.7,\"prompt_min\":16,\"prompt_cap\":8192,\"output_min\":64,\"output_max\":512}\n",
                   0) == 0);
  std::string expected = workload_json_header(o.workload) + "\n";
  for (const Request& r : make_workload(o.workload)) {
    expected += "{\"id\":" + std::to_string(r.id) + ",\"prompt_len\":" + std::to_string(r.prompt_len) +
                ",\"output_len\":" + std::to_string(r.output_len) + "}\n";
  }
  CHECK(text == expected);
  CHECK(std::count(text.begin(), text.end(), '\n') == 6);
}
