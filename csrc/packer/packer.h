// Length-bucketing packer: naive batching, LongAlign sorted batching, and best-fit-decreasing
// bin packing with rank balancing. Pure C++ over int64 lengths; no torch, no Python.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace longalign {

struct PackConfig {
  int64_t max_tokens = 0;
  std::string strategy = "bfd";   // naive | sorted | bfd
  int64_t world_size = 1;
  int64_t batch_size = 1;         // sequences per rank per step (naive, sorted)
  bool batch_size_given = false;  // naive comparison uses the mean pack size when not given
  std::string balance = "attention";  // tokens | attention (bfd)
  std::string overlong = "error";     // error | drop | truncate
  uint64_t seed = 0;
  double linear_cost = 0.0;       // `a` in the rank cost sum(L^2) + a*sum(L)
};

// A plan: micro-batches ("packs") laid out step-major, exactly world_size per step
// (pack p is step p / world_size, rank p % world_size; a rank with nothing left gets an
// empty pack in the last step). Sequence indices of pack p are order[offsets[p]:offsets[p+1]].
struct PackResult {
  std::vector<int64_t> order;
  std::vector<int64_t> offsets;
  std::vector<int64_t> effective_lengths;  // per input sequence: truncated length, 0 if dropped
  std::vector<int64_t> dropped;
  std::vector<int64_t> truncated;
  int64_t num_steps = 0;
  // statistics
  double efficiency = 0.0;
  double padding_ratio = 0.0;
  double imbalance = 0.0;
  double est_speedup_vs_naive = 0.0;
  double est_cost = 0.0;  // sum over steps of the slowest rank's cost
  int64_t real_tokens = 0;
  int64_t paid_tokens = 0;
};

// Throws std::invalid_argument with a message naming the argument and the number of items hit.
PackResult pack(const int64_t* lengths, int64_t n, const PackConfig& cfg);

}  // namespace longalign
