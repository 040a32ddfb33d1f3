// One KV budget split between the ring and the pages ([serve][memory]):
//   1. the ring's share is the workload's ring bytes over its ring and page
//      bytes, each held over the requests' lives (rows x output length against
//      page-iterations; a sum, not the mean of per-request shares), and a
//      budget split by it holds the same requests in rows as in pages;
//   2. ring rows: at least 1 and at least the largest request's, below the budget;
//   3. pages: what the ring leaves, then shrunk by the measured excess;
//   4. bad inputs throw std::invalid_argument naming the value;
//   5. budget_ring_rows: the share scaled (at most half the budget), one prefill
//      iteration's windows on top and reserved, given bytes as they are.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "serve/memory_split.hpp"

using namespace pyramidinfer::serve;

namespace {

Request req(int id, int prompt, int output) {
  Request r;
  r.id = id, r.prompt_len = prompt, r.output_len = output;
  return r;
}

/// Rows: a tenth of the prompt; page-iterations: the id plus one, times the
/// output length (one more page per id held over the whole life), so that
/// each comes from its own field.
std::int64_t tenth(int prompt_len) { return prompt_len / 10; }
std::int64_t output_pages(const Request& r) { return std::int64_t(r.id + 1) * r.output_len; }

std::string invalid_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("ring_share: ring bytes over ring and page bytes, held over the requests' lives", "[serve][memory]") {
  // rows 10 x 5 iterations and 30 x 15 of 8 bytes = 4,000; page-iterations 1 x 5 + 2 x 15 = 35 of 2 bytes = 70
  const std::vector<Request> two = {req(0, 100, 5), req(1, 300, 15)};
  CHECK(ring_share(two, tenth, output_pages, 8, 2) == Approx(4000.0 / 4070.0));
  // one request: 3 rows and 1 page of 100 bytes, both held 7 iterations
  CHECK(ring_share({req(0, 30, 7)}, tenth, output_pages, 100, 100) == Approx(0.75));
  // a longer life weighs more: the same rows and pages held 3x as long count 3x
  const std::vector<Request> lives = {req(0, 10, 1), req(0, 90, 3)};  // rows 1 x 1 + 9 x 3 = 28, pages 1 + 3 = 4
  CHECK(ring_share(lives, tenth, output_pages, 1, 1) == Approx(28.0 / 32.0));
  // a sum, not a mean: shares 1/2 and 9/10 alone (mean 0.7) are 10/12 together
  const std::vector<Request> mixed = {req(0, 10, 1), req(0, 90, 1)};
  CHECK(ring_share(mixed, tenth, output_pages, 1, 1) == Approx(10.0 / 12.0));
  // no ring rows (a full cache's window of 0): the pages get everything
  CHECK(ring_share(two, [](int) { return std::int64_t(0); }, output_pages, 8, 2) == 0.0);
}

TEST_CASE("ring_share: a budget split by it holds as many requests in rows as in pages", "[serve][memory]") {
  // identical requests: 12 rows of 100 bytes, 1 page of 64 bytes, over 30 iterations; a budget of 10 requests' worth
  const std::vector<Request> same(5, req(0, 120, 30));
  const std::size_t row = 100, page = 64;
  const std::uint64_t budget = 10 * (12 * row + 1 * page);
  const double share = ring_share(same, tenth, output_pages, row, page);
  const std::int64_t rows = ring_rows_of_share(share, budget, row, 12);
  CHECK(rows == 10 * 12);
  CHECK(pages_beside(budget, std::uint64_t(rows) * row, page) == 10 * 1);
}

TEST_CASE("ring rows of a share: at least 1 and the largest request's, below the budget", "[serve][memory]") {
  CHECK(ring_rows_of_share(0.25, 1000, 10, 0) == 25);
  CHECK(ring_rows_of_share(0.25, 1001, 10, 0) == 25);  // whole rows, rounded down
  CHECK(ring_rows_of_share(0.25, 1000, 10, 40) == 40);  // the largest request must fit
  CHECK(ring_rows_of_share(0.25, 1000, 300, 0) == 1);   // a share below one row: one row
  CHECK(ring_rows_of_share(0.0, 1000, 10, 0) == 1);
  CHECK(ring_rows_of_share(0.0, 1000, 10, 7) == 7);
  CHECK(ring_rows_of_share(0.5, 1000, 10, 0) == 50);
  // the largest request's rows fill the budget: nothing left for pages
  CHECK_THAT(invalid_of([] { ring_rows_of_share(0.1, 1000, 10, 100); }),
             Catch::Contains("100 rows") && Catch::Contains("budget of 1000 bytes"));
}

TEST_CASE("ring rows of --ring-gb's bytes", "[serve][memory]") {
  CHECK(ring_rows_of_bytes(250, 1000, 10, 0) == 25);
  CHECK(ring_rows_of_bytes(259, 1000, 10, 25) == 25);
  CHECK(ring_rows_of_bytes(5, 1000, 10, 0) == 1);
  CHECK(ring_rows_of_bytes(5, 1000, 10, 1) == 1);
  CHECK_THAT(invalid_of([] { ring_rows_of_bytes(250, 1000, 10, 26); }),
             Catch::Contains("holds 25 rows") && Catch::Contains("26"));
  CHECK_THAT(invalid_of([] { ring_rows_of_bytes(1000, 1000, 10, 0); }), Catch::Contains("ring of 1000 bytes"));
  CHECK_THAT(invalid_of([] { ring_rows_of_bytes(2000, 1000, 10, 0); }), Catch::Contains("ring of 2000 bytes"));
}

TEST_CASE("pages: what the ring leaves, shrunk by the measured excess in whole pages", "[serve][memory]") {
  CHECK(pages_beside(1000, 250, 100) == 7);
  CHECK(pages_beside(1000, 0, 100) == 10);
  CHECK_THAT(invalid_of([] { pages_beside(1000, 950, 100); }), Catch::Contains("leaves no page"));
  CHECK_THAT(invalid_of([] { pages_beside(1000, 1000, 100); }), Catch::Contains("leaves no page"));
  CHECK(pages_within(10, 1000, 1000, 100) == 10);  // at the budget: unchanged
  CHECK(pages_within(10, 400, 1000, 100) == 10);   // below: unchanged (the budget is a cap)
  CHECK(pages_within(10, 1001, 1000, 100) == 9);   // one byte over: one page
  CHECK(pages_within(10, 1100, 1000, 100) == 9);
  CHECK(pages_within(10, 1101, 1000, 100) == 8);
  CHECK_THAT(invalid_of([] { pages_within(2, 1201, 1000, 100); }), Catch::Contains("3 fewer leave no page"));
}

TEST_CASE("memory split: bad inputs throw naming the value", "[serve][memory]") {
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  for (const double share : {-0.1, 1.0, 1.5, nan, inf})
    CHECK_THAT(invalid_of([&] { ring_rows_of_share(share, 1000, 10, 0); }),
               Catch::Contains("ring share " + std::to_string(share)));
  CHECK(gib_bytes(1.5, "--pool-gb") == 3 * (std::uint64_t(1) << 29));
  for (const double gib : {0.0, -1.0, nan, inf, 1e12})
    CHECK_THAT(invalid_of([&] { gib_bytes(gib, "--pool-gb"); }), Catch::Contains("--pool-gb = " + std::to_string(gib)));
  CHECK_THAT(invalid_of([] { ring_share({}, tenth, output_pages, 1, 1); }), Catch::Contains("no requests"));
  CHECK_THAT(invalid_of([] { ring_share({req(0, 10, 1)}, tenth, output_pages, 0, 1); }), Catch::Contains("row_bytes = 0"));
  CHECK_THAT(invalid_of([] { ring_share({req(3, 10, 1)}, tenth, [](const Request&) { return std::int64_t(-1); }, 1, 1); }),
             Catch::Contains("request 3"));
  CHECK_THAT(invalid_of([] { ring_share({req(0, 5, 0)}, tenth, output_pages, 1, 1); }), Catch::Contains("no ring rows"));
}

TEST_CASE("budget_ring_rows: the share scaled, a prefill's windows on top and reserved for them", "[serve][memory]") {
  RingInputs in;
  in.rule.model = pyramidinfer::ModelShape{2, 4, 2, 8, pyramidinfer::DType::f16};
  in.rule.recent_ratio = 0.25, in.rule.segment = 4, in.rule.compress_decode = true, in.rule.accumulating = true;
  for (int i = 0; i < 20; ++i) in.reqs.push_back(req(i, 200 + 10 * i, 30));
  in.budget = 1 << 24;
  in.prefill_tokens = 400;
  in.page_iterations = [](const Request& r) { return std::int64_t(r.output_len) * 20; };
  in.page_bytes = 4096;
  const std::size_t row = in.rule.row_bytes(2);
  const std::int64_t windows = in.rule.rows(400).transient;
  REQUIRE(windows == pyramidinfer::window_length(400, 0.25));
  const RingSplit one = budget_ring_rows(in), two = budget_ring_rows(in, 2.0);
  const double share = ring_share(
      in.reqs, [&](int p) { return in.rule.rows(p).held; }, in.page_iterations, row, in.page_bytes);
  CHECK(one.rows == ring_rows_of_share(share, in.budget, row, 0) + windows);
  CHECK(two.rows == ring_rows_of_share(2 * share, in.budget, row, 0) + windows);
  CHECK(one.reserve == windows);
  CHECK_THAT(one.from, Catch::Contains("1 x the workload's share"));
  // a scale past half the budget stops there
  CHECK(budget_ring_rows(in, 1e9).rows == ring_rows_of_share(0.5, in.budget, row, 0) + windows);
  // given bytes are taken as they are; the reserve still leaves the largest request's held rows below it
  std::int64_t largest = 0, largest_held = 0;
  for (const Request& r : in.reqs) {
    largest = std::max(largest, in.rule.rows(r.prompt_len).at_begin());
    largest_held = std::max(largest_held, in.rule.rows(r.prompt_len).held);
  }
  REQUIRE(largest - largest_held < windows);  // the smallest ring that starts every request: the reserve is cut
  in.ring_bytes = std::uint64_t(row) * std::uint64_t(largest);
  const RingSplit given = budget_ring_rows(in);
  CHECK(given.rows == largest);
  CHECK(given.reserve == largest - largest_held);
  CHECK(given.from == "--ring-gb");
  in.ring_bytes = 0;
  CHECK_THAT(invalid_of([&] { budget_ring_rows(in, 0.0); }), Catch::Contains("scale = 0"));
  CHECK_THAT(invalid_of([&] { budget_ring_rows(in, -1.0); }), Catch::Contains("scale = -1"));
}
