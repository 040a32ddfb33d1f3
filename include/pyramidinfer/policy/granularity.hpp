// Whether one selection serves all KV heads of a sequence (the paper) or each
// KV head selects its own tokens (better for grouped-query attention).
#pragma once

namespace pyramidinfer {

enum class Granularity { shared, per_kv_head };

inline const char* granularity_name(Granularity g) {
  return g == Granularity::shared ? "shared" : "per_kv_head";
}

}  // namespace pyramidinfer
