// memory_split.hpp - one device budget for the KV cache (pyramid-serve's
// --pool-gb): KV pages, the paged cache's state and the compressor's state,
// whose largest part is the window-query ring. Every policy gets the same
// budget, so a policy that needs the ring (its window's queries, or a stash
// and accumulators when decode scores accumulate) pays for it in pages.
//
// The ring's part comes from the workload unless given (--ring-gb): each
// request holds ring rows and pages from admission to its end, its rows fixed
// and its pages falling as decode compression frees them. Splitting the
// budget in the proportion the requests hold the two over their lives
// (row-iterations against page-iterations, summed over the workload) lets
// neither run out first on average. (Splitting by peak pages instead left
// the compressing policies ring-bound with pages to spare: pyramid-serve-plan
// on the sixth device run's pools.)
// Host only, no CUDA.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include <pyramidinfer/cache/ring_pool.hpp>

#include "serve/workload.hpp"

namespace pyramidinfer::serve {

/// Ring rows a request with this prompt holds after its prefill (RingRows::held).
using RowsOf = std::function<std::int64_t(int prompt_len)>;
/// Pages a request holds summed over the iterations of its life (its page curve's sum()).
using PagesOf = std::function<std::int64_t(const Request&)>;

/// Bytes of `gib` GiB, the value of `what` (a flag): finite and > 0, else std::invalid_argument naming both.
inline std::uint64_t gib_bytes(double gib, const std::string& what) {
  const double bytes = gib * double(1ull << 30);
  if (!std::isfinite(gib) || !(gib > 0) || bytes >= 9.0e18)
    throw std::invalid_argument(what + " = " + std::to_string(gib) + " GiB: must be finite, > 0 and < 8 EiB");
  return std::uint64_t(bytes);
}

/// The ring's share of the budget for `reqs`: over the requests' lives,
/// sum_r rows(r) * output_len(r) * row_bytes against that plus
/// sum_r page_iterations(r) * page_bytes.
inline double ring_share(const std::vector<Request>& reqs, const RowsOf& rows_of, const PagesOf& page_iterations,
                         std::size_t row_bytes, std::size_t page_bytes) {
  if (reqs.empty()) throw std::invalid_argument("ring_share: the workload has no requests");
  if (row_bytes == 0 || page_bytes == 0)
    throw std::invalid_argument("ring_share: row_bytes = " + std::to_string(row_bytes) + ", page_bytes = " +
                                std::to_string(page_bytes) + " (both must be >= 1)");
  double ring = 0, pages = 0;
  for (const Request& r : reqs) {
    const std::int64_t rows = rows_of(r.prompt_len), held = page_iterations(r);
    if (rows < 0 || held < 0)
      throw std::invalid_argument("ring_share: request " + std::to_string(r.id) + " holds " + std::to_string(rows) +
                                  " ring rows and " + std::to_string(held) +
                                  " page-iterations (neither may be negative)");
    ring += double(rows) * double(r.output_len) * double(row_bytes);
    pages += double(held) * double(page_bytes);
  }
  if (!(ring + pages > 0)) throw std::invalid_argument("ring_share: the workload holds no ring rows and no pages");
  return ring / (ring + pages);
}

/// `rows` ring rows of `row_bytes`, checked to leave part of `budget` bytes for the pages.
inline std::int64_t ring_within(std::int64_t rows, std::size_t row_bytes, std::uint64_t budget) {
  if (double(rows) * double(row_bytes) >= double(budget))
    throw std::invalid_argument("ring of " + std::to_string(rows) + " rows of " + std::to_string(row_bytes) +
                                " bytes: not below the KV budget of " + std::to_string(budget) + " bytes");
  return rows;
}

/// Ring rows of `share` of `budget` bytes: at least 1, and at least
/// `largest_rows` (the largest request's, so that every request can be admitted).
inline std::int64_t ring_rows_of_share(double share, std::uint64_t budget, std::size_t row_bytes,
                                       std::int64_t largest_rows) {
  if (!std::isfinite(share) || share < 0 || share >= 1)
    throw std::invalid_argument("ring share " + std::to_string(share) + ": must be finite and in [0, 1)");
  if (row_bytes == 0) throw std::invalid_argument("ring_rows_of_share: row_bytes must be >= 1");
  const auto rows = std::int64_t(share * double(budget) / double(row_bytes));
  return ring_within(std::max<std::int64_t>({1, rows, largest_rows}), row_bytes, budget);
}

/// Ring rows of `ring_bytes` given (--ring-gb) out of `budget` bytes (at
/// least 1); fewer than `largest_rows` throws: that request could never start.
inline std::int64_t ring_rows_of_bytes(std::uint64_t ring_bytes, std::uint64_t budget, std::size_t row_bytes,
                                       std::int64_t largest_rows) {
  if (row_bytes == 0) throw std::invalid_argument("ring_rows_of_bytes: row_bytes must be >= 1");
  if (ring_bytes >= budget)
    throw std::invalid_argument("ring of " + std::to_string(ring_bytes) + " bytes: not below the KV budget of " +
                                std::to_string(budget) + " bytes");
  const std::int64_t rows = std::max<std::int64_t>(1, std::int64_t(ring_bytes / row_bytes));
  if (rows < largest_rows)
    throw std::invalid_argument("ring of " + std::to_string(ring_bytes) + " bytes holds " + std::to_string(rows) +
                                " rows, fewer than the " + std::to_string(largest_rows) +
                                " the workload's largest request needs");
  return ring_within(rows, row_bytes, budget);
}

/// KV pages in what `budget` leaves beside a ring of `ring_bytes`, before
/// the states are measured (the first open; pages_within then shrinks it).
inline std::int64_t pages_beside(std::uint64_t budget, std::uint64_t ring_bytes, std::size_t page_bytes) {
  if (page_bytes == 0) throw std::invalid_argument("pages_beside: page_bytes must be >= 1");
  const std::uint64_t pages = ring_bytes < budget ? (budget - ring_bytes) / page_bytes : 0;
  if (pages < 1)
    throw std::invalid_argument("KV budget of " + std::to_string(budget) + " bytes: a ring of " +
                                std::to_string(ring_bytes) + " bytes leaves no page of " + std::to_string(page_bytes) +
                                " bytes");
  return std::int64_t(std::min<std::uint64_t>(pages, std::uint64_t(std::numeric_limits<std::int64_t>::max())));
}

/// KV pages once an open pool of `pages` measured `total` bytes (pages and
/// states) against `budget`: shrunk by the excess, rounded up to whole pages
/// (the states do not grow with fewer pages, so the result fits). Throws
/// std::invalid_argument when no page would be left.
inline std::int64_t pages_within(std::int64_t pages, std::uint64_t total, std::uint64_t budget, std::size_t page_bytes) {
  if (page_bytes == 0) throw std::invalid_argument("pages_within: page_bytes must be >= 1");
  if (total <= budget) return pages;
  const std::uint64_t excess = total - budget, fewer = (excess + page_bytes - 1) / page_bytes;
  if (pages < 1 || fewer >= std::uint64_t(pages))
    throw std::invalid_argument("KV budget of " + std::to_string(budget) + " bytes: " + std::to_string(pages) +
                                " pages take " + std::to_string(total) + " bytes with the states; " +
                                std::to_string(fewer) + " fewer leave no page");
  return pages - std::int64_t(fewer);
}

/// The ring's rows within a budget, and where their count came from.
struct RingSplit {
  std::int64_t rows = 0;
  std::int64_t reserve = 0;  ///< of them, kept for one prefill iteration's windows (RingPool::set_reserve)
  std::string from;          ///< "--ring-gb" or the workload's share
};

/// What sizes the ring: the rule of the compressor, the requests (the
/// measured runs' and the warm-up's) and the budget.
struct RingInputs {
  RingRule rule;
  std::vector<Request> reqs, warmup;
  std::uint64_t budget = 0;
  std::uint64_t ring_bytes = 0;  ///< given (--ring-gb); 0: the workload's share
  int prefill_tokens = 1;        ///< prompt tokens of one prefill iteration
  PagesOf page_iterations;       ///< a request's pages summed over its life (page curve, the run's fire schedule)
  std::size_t page_bytes = 0;
};

/// The ring rows of `in` (queries of 2 bytes): the bytes given, or
/// `scale` x the workload's share (ring_share of the rows the requests hold
/// after their prefill against their pages, over their lives; at most half
/// the budget) plus one prefill iteration's windows (held only through the
/// prefill); at least the rows of the largest request. The windows' part is
/// reserved for them, as far as the largest request's held rows leave room
/// below it. (The share is what an average moment needs; admissions come in
/// bursts, so pyramid-serve plans a few scales: plan.hpp.)
inline RingSplit budget_ring_rows(const RingInputs& in, double scale = 1.0) {
  const std::size_t row_bytes = in.rule.row_bytes(2);
  std::int64_t largest = 0, largest_held = 0;
  for (const std::vector<Request>* list : {&in.reqs, &in.warmup})
    for (const Request& r : *list) {
      largest = std::max(largest, in.rule.rows(r.prompt_len).at_begin());
      largest_held = std::max(largest_held, in.rule.rows(r.prompt_len).held);
    }
  const std::int64_t windows = in.rule.rows(in.prefill_tokens).transient;
  RingSplit s;
  if (in.ring_bytes > 0) {
    s.from = "--ring-gb";
    s.rows = ring_rows_of_bytes(in.ring_bytes, in.budget, row_bytes, largest);
  } else {
    if (!std::isfinite(scale) || !(scale > 0))
      throw std::invalid_argument("budget_ring_rows: scale = " + std::to_string(scale) + " must be finite and > 0");
    const double share = ring_share(
        in.reqs, [&](int prompt_len) { return in.rule.rows(prompt_len).held; }, in.page_iterations, row_bytes,
        in.page_bytes);
    char b[96];
    std::snprintf(b, sizeof b, "%.3g x the workload's share %.6g", scale, share);
    s.from = std::string(b) + " + " + std::to_string(windows) + " rows for a prefill's windows";
    const double scaled = std::min(0.5, scale * share);
    s.rows = ring_within(ring_rows_of_share(scaled, in.budget, row_bytes, largest) + windows, row_bytes, in.budget);
  }
  s.reserve = std::max<std::int64_t>(0, std::min(windows, s.rows - largest_held));
  return s;
}

}  // namespace pyramidinfer::serve
