#include "packer.h"

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <set>
#include <stdexcept>

#include "../common/hash.h"

namespace longalign {
namespace {

// Reusable per-thread buffers for the internal arrays: fresh multi-MB vectors on every call
// cost more in page faults than the packing itself (measured: ~1000 faults per 100K-sequence call).
enum ScratchSlot { kCount, kStart, kBinOf, kFill, kPerm, kKept, kNumSlots };
std::vector<int64_t>& scratch(ScratchSlot slot, size_t n, int64_t value) {
  static thread_local std::vector<int64_t> buffers[kNumSlots];
  buffers[slot].assign(n, value);
  return buffers[slot];
}

// Fisher-Yates driven by the shared counter-based hash: the same permutation on every machine.
template <typename T>
void seeded_shuffle(std::vector<T>& v, uint64_t seed, uint64_t stream) {
  const uint64_t prefix = hash_prefix(seed, stream);  // hash3(seed, stream, i) without re-mixing the seed
  for (int64_t i = static_cast<int64_t>(v.size()) - 1; i > 0; --i) {
    const int64_t j = uniform_int(mix64(prefix ^ static_cast<uint64_t>(i)), 0, i);
    std::swap(v[i], v[j]);
  }
}

// Tables indexed by length (counting sort, the room bitset) are used while the longest length
// is within a constant of the count: memory O(n + max_len) stays O(n). Past that (a few very
// long sequences), comparison sort and an ordered set of rooms: O(n log n), no length tables.
bool length_tables_fit(int64_t max_len, size_t n) {
  return max_len <= std::max<int64_t>(int64_t{1} << 16, 8 * static_cast<int64_t>(n));
}

// Indices of the kept sequences sorted by length, ties by index; counting sort, O(n + max_len).
std::vector<int64_t> sort_by_length(const std::vector<int64_t>& kept, const std::vector<int64_t>& len,
                                    int64_t max_len, bool descending) {
  if (!length_tables_fit(max_len, kept.size())) {
    std::vector<int64_t> out(kept);
    std::stable_sort(out.begin(), out.end(), [&](int64_t a, int64_t b) {
      return descending ? len[a] > len[b] : len[a] < len[b];
    });
    return out;
  }
  std::vector<int64_t>& count = scratch(kCount, max_len + 2, 0);
  for (int64_t i : kept) count[len[i] + 1]++;
  if (descending) {
    // bucket start for length L = number of items longer than L
    std::vector<int64_t>& start = scratch(kStart, max_len + 2, 0);
    int64_t acc = 0;
    for (int64_t L = max_len; L >= 0; --L) { start[L] = acc; acc += count[L + 1]; }
    std::vector<int64_t> out(kept.size());
    for (int64_t i : kept) out[start[len[i]]++] = i;
    return out;
  }
  for (int64_t L = 1; L < max_len + 2; ++L) count[L] += count[L - 1];
  std::vector<int64_t> out(kept.size());
  for (int64_t i : kept) out[count[len[i]]++] = i;
  return out;
}

// Packs laid out flat: items of pack p are order[offsets[p]:offsets[p+1]].
struct Packs {
  std::vector<int64_t> order;
  std::vector<int64_t> offsets{0};
  int64_t size() const { return static_cast<int64_t>(offsets.size()) - 1; }
  int64_t begin(int64_t p) const { return offsets[p]; }
  int64_t end(int64_t p) const { return offsets[p + 1]; }
  void close() { offsets.push_back(static_cast<int64_t>(order.size())); }
};

// Set of capacities 0..cap with an open bin, as a 64-ary tree of bit words: "smallest member
// >= L" is one masked ctz per level, ceil(log64(cap+1)) levels (3 at 64K), all in cache.
class CapacitySet {
 public:
  explicit CapacitySet(int64_t cap) {
    int64_t n = cap + 1;
    do {
      n = (n + 63) / 64;
      levels_.emplace_back(n, 0);
    } while (n > 1);
  }
  void insert(int64_t c) {
    for (auto& lv : levels_) {
      uint64_t& w = lv[c >> 6];
      const bool was_empty = w == 0;
      w |= 1ull << (c & 63);
      if (!was_empty) return;
      c >>= 6;
    }
  }
  void erase(int64_t c) {
    for (auto& lv : levels_) {
      uint64_t& w = lv[c >> 6];
      w &= ~(1ull << (c & 63));
      if (w != 0) return;
      c >>= 6;
    }
  }
  // Smallest member >= L, or -1.
  int64_t first_at_least(int64_t L) const {
    int64_t i = L;
    size_t lv = 0;
    for (; lv < levels_.size(); ++lv) {  // climb until a word holds a member at or after i
      const int64_t word = i >> 6;
      if (word >= static_cast<int64_t>(levels_[lv].size())) return -1;
      const uint64_t bits = levels_[lv][word] & (~0ull << (i & 63));
      if (bits) { i = (word << 6) | __builtin_ctzll(bits); break; }
      i = word + 1;  // next word, one level up
    }
    if (lv == levels_.size()) return -1;
    while (lv-- > 0) i = (i << 6) | __builtin_ctzll(levels_[lv][i]);  // leftmost member below
    return i;
  }

 private:
  std::vector<std::vector<uint64_t>> levels_;
};

// Bins of a best-fit-decreasing packing, with each bin's tokens and sum of squared lengths
// accumulated while placing (no second pass over the items).
struct Bins {
  Packs packs;
  std::vector<int64_t> tokens;
  std::vector<double> sum_sq;
};

// Best-fit decreasing: each item, longest first, goes to an open bin with the least room that
// fits it. Bins of equal room are interchangeable, so each room keeps a stack of bins.
// Memory and time follow the data, not the capacity: rooms up to the longest item (lmax) live
// in the bitset tree and the room -> bin table (both lmax + 1 entries); a larger room fits any
// item, so those bins wait in an ordered set and the smallest of them is taken only when no
// room in [L, lmax] exists (still exactly best fit). When lmax dwarfs the count, every room
// lives in the ordered set (lower_bound: smallest room >= L).
Bins best_fit_decreasing(const std::vector<int64_t>& by_len_desc, const std::vector<int64_t>& len, int64_t cap) {
  const int64_t lmax = by_len_desc.empty() ? 0 : len[by_len_desc.front()];
  const int64_t small = length_tables_fit(lmax, by_len_desc.size()) ? std::min(cap, lmax) : 0;
  CapacitySet rooms(small);
  static thread_local std::vector<int64_t> head;
  head.assign(small + 1, -1);  // room -> top bin of its stack
  std::set<std::pair<int64_t, int64_t>> big;  // (room, bin) for rooms > small
  std::vector<int64_t> next_bin, remaining, bin_size;
  std::vector<double> sum_sq;
  std::vector<int64_t>& bin_of = scratch(kBinOf, by_len_desc.size(), 0);

  for (size_t k = 0; k < by_len_desc.size(); ++k) {
    const int64_t L = len[by_len_desc[k]];
    const int64_t c = rooms.first_at_least(L);
    int64_t b;
    if (c >= 0) {
      b = head[c];
      head[c] = next_bin[b];
      if (head[c] < 0) rooms.erase(c);
    } else if (auto it = big.lower_bound({L, int64_t{-1}}); it != big.end()) {
      b = it->second;
      big.erase(it);
    } else {
      b = static_cast<int64_t>(remaining.size());
      remaining.push_back(cap);
      next_bin.push_back(-1);
      bin_size.push_back(0);
      sum_sq.push_back(0.0);
    }
    bin_of[k] = b;
    bin_size[b]++;
    sum_sq[b] += static_cast<double>(L) * L;
    const int64_t r = remaining[b] -= L;
    if (r > small && r > 0) {
      big.emplace(r, b);
    } else if (r > 0) {
      if (head[r] < 0) rooms.insert(r);
      next_bin[b] = head[r];
      head[r] = b;
    }
  }
  Bins bins;
  Packs& packs = bins.packs;
  packs.offsets.assign(bin_size.size() + 1, 0);
  for (size_t b = 0; b < bin_size.size(); ++b) packs.offsets[b + 1] = packs.offsets[b] + bin_size[b];
  packs.order.resize(by_len_desc.size());
  std::vector<int64_t>& fill = scratch(kFill, bin_size.size(), 0);
  std::copy(packs.offsets.begin(), packs.offsets.end() - 1, fill.begin());
  for (size_t k = 0; k < by_len_desc.size(); ++k) packs.order[fill[bin_of[k]]++] = by_len_desc[k];
  bins.tokens.resize(remaining.size());
  for (size_t b = 0; b < remaining.size(); ++b) bins.tokens[b] = cap - remaining[b];
  bins.sum_sq = std::move(sum_sq);
  return bins;
}

// A padded micro-batch pays attention and projections on every slot of its longest sequence.
double padded_cost(int64_t count, int64_t longest, double a) {
  const double m = static_cast<double>(longest);
  return static_cast<double>(count) * (m * m + a * m);
}

double pack_cost(const Packs& packs, int64_t p, const std::vector<int64_t>& len, bool padded, double a) {
  const int64_t b = packs.begin(p), e = packs.end(p);
  if (b == e) return 0.0;
  if (padded) {
    int64_t m = 0;
    for (int64_t k = b; k < e; ++k) m = std::max(m, len[packs.order[k]]);
    return padded_cost(e - b, m, a);
  }
  double c = 0;
  for (int64_t k = b; k < e; ++k) {
    const double L = static_cast<double>(len[packs.order[k]]);
    c += L * L + a * L;
  }
  return c;
}

// ceil(n / d) for n >= 0, d >= 1, without forming n + d - 1 (d may be near INT64_MAX).
int64_t ceil_div(int64_t n, int64_t d) { return n == 0 ? 0 : 1 + (n - 1) / d; }

// Appends micro-batches of `per_rank` consecutive items, then empty ones up to a whole step.
void append_batches(Packs& packs, const int64_t* seq, int64_t n, int64_t per_rank, int64_t world) {
  for (int64_t s = 0; s < n;) {
    const int64_t e = s + std::min(per_rank, n - s);  // never s + per_rank: it may overflow
    packs.order.insert(packs.order.end(), seq + s, seq + e);
    packs.close();
    s = e;
  }
  while (packs.size() % world) packs.close();
}

struct StepStats {
  double total = 0.0;      // sum over steps of the slowest rank's cost
  double imbalance = 0.0;  // mean over steps of max / mean rank cost
};

// Sum over steps of the slowest rank's cost, and the mean over steps of max / mean rank cost,
// for any rank_cost(step, rank).
template <typename RankCost>
StepStats accumulate_steps(int64_t steps, int64_t world, RankCost rank_cost) {
  StepStats st;
  for (int64_t s = 0; s < steps; ++s) {
    double mx = 0, sum = 0;
    for (int64_t r = 0; r < world; ++r) {
      const double c = rank_cost(s, r);
      mx = std::max(mx, c);
      sum += c;
    }
    st.total += mx;
    st.imbalance += sum > 0 ? mx / (sum / world) : 1.0;
  }
  if (steps) st.imbalance /= steps;
  return st;
}

StepStats step_stats(const Packs& packs, const std::vector<int64_t>& len, bool padded, double a, int64_t world) {
  return accumulate_steps(packs.size() / world, world,
                          [&](int64_t s, int64_t r) { return pack_cost(packs, s * world + r, len, padded, a); });
}

// Step statistics of the naive plan without materialising it (it is only the baseline of
// est_speedup_vs_naive): walk the shuffled order in micro-batches and cost them directly.
StepStats naive_step_stats(const std::vector<int64_t>& kept, int64_t batch, int64_t world, uint64_t seed,
                           const std::vector<int64_t>& len, double a) {
  std::vector<int64_t>& perm = scratch(kPerm, 0, 0);
  perm.assign(kept.begin(), kept.end());
  seeded_shuffle(perm, seed, /*stream=*/1);
  const int64_t n = static_cast<int64_t>(perm.size()), per_step = batch * world;
  return accumulate_steps(ceil_div(n, per_step), world, [&](int64_t s, int64_t r) {
    // s * per_step <= n - 1, and r * batch is only formed for ranks that get items (< left):
    // no product can overflow however large batch * world is
    const int64_t step_start = s * per_step, left = n - step_start;
    const bool has_items = r < ceil_div(left, batch);
    const int64_t lo = has_items ? r * batch : left;
    const int64_t b = step_start + lo, e = step_start + (has_items ? lo + std::min(batch, left - lo) : left);
    int64_t m = 0;
    for (int64_t k = b; k < e; ++k) m = std::max(m, len[perm[k]]);
    return b == e ? 0.0 : padded_cost(e - b, m, a);
  });
}

Packs naive_packs(const std::vector<int64_t>& kept, int64_t batch, int64_t world, uint64_t seed) {
  std::vector<int64_t> perm = kept;
  seeded_shuffle(perm, seed, /*stream=*/1);
  Packs packs;
  packs.order.reserve(perm.size());
  append_batches(packs, perm.data(), static_cast<int64_t>(perm.size()), batch, world);
  return packs;
}

}  // namespace

PackResult pack(const int64_t* lengths, int64_t n, const PackConfig& cfg) {
  if (cfg.max_tokens < 1) throw std::invalid_argument("max_tokens must be >= 1, got " + std::to_string(cfg.max_tokens));
  if (cfg.world_size < 1) throw std::invalid_argument("world_size must be >= 1, got " + std::to_string(cfg.world_size));
  if (cfg.batch_size < 1) throw std::invalid_argument("batch_size must be >= 1, got " + std::to_string(cfg.batch_size));
  if (cfg.batch_size > INT64_MAX / cfg.world_size)
    throw std::invalid_argument("batch_size * world_size must fit in 64 bits, got " + std::to_string(cfg.batch_size) +
                                " * " + std::to_string(cfg.world_size));
  if (cfg.strategy != "naive" && cfg.strategy != "sorted" && cfg.strategy != "bfd")
    throw std::invalid_argument("strategy must be 'naive', 'sorted' or 'bfd', got '" + cfg.strategy + "'");
  if (cfg.balance != "tokens" && cfg.balance != "attention")
    throw std::invalid_argument("balance must be 'tokens' or 'attention', got '" + cfg.balance + "'");
  if (cfg.overlong != "error" && cfg.overlong != "drop" && cfg.overlong != "truncate")
    throw std::invalid_argument("overlong must be 'error', 'drop' or 'truncate', got '" + cfg.overlong + "'");

  int64_t bad = 0, first_bad = -1, over = 0, first_over = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (lengths[i] < 1) { if (!bad++) first_bad = i; }
    else if (lengths[i] > cfg.max_tokens) { if (!over++) first_over = i; }
  }
  if (bad)
    throw std::invalid_argument("lengths must be positive: " + std::to_string(bad) + " of " + std::to_string(n) +
                                " are <= 0 (first at index " + std::to_string(first_bad) + ": " +
                                std::to_string(lengths[first_bad]) + ")");
  if (over && cfg.overlong == "error")
    throw std::invalid_argument("lengths: " + std::to_string(over) + " of " + std::to_string(n) +
                                " sequences are longer than max_tokens=" + std::to_string(cfg.max_tokens) +
                                " (first at index " + std::to_string(first_over) + ": " +
                                std::to_string(lengths[first_over]) + "); pass overlong='drop' or 'truncate'");

  PackResult res;
  const int64_t W = cfg.world_size;
  const double a = cfg.linear_cost;
  std::vector<int64_t>& len = res.effective_lengths;
  len.assign(lengths, lengths + n);
  std::vector<int64_t>& kept = scratch(kKept, 0, 0);
  kept.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    if (len[i] > cfg.max_tokens) {
      if (cfg.overlong == "drop") { res.dropped.push_back(i); len[i] = 0; continue; }
      res.truncated.push_back(i);
      len[i] = cfg.max_tokens;
    }
    kept.push_back(i);
  }

  // sorts and tables are sized by the longest kept sequence, never by max_tokens
  int64_t longest = 0;
  for (int64_t i : kept) longest = std::max(longest, len[i]);

  Packs packs;
  const bool padded = cfg.strategy != "bfd";
  if (cfg.strategy == "naive") {
    packs = naive_packs(kept, cfg.batch_size, W, cfg.seed);
  } else if (cfg.strategy == "sorted") {
    // LongAlign sorted batching: groups of similar length, one group per step, groups shuffled.
    const std::vector<int64_t> sorted = sort_by_length(kept, len, longest, /*descending=*/false);
    const int64_t total = static_cast<int64_t>(sorted.size()), group = cfg.batch_size * W;
    std::vector<int64_t> group_ids(ceil_div(total, group));
    std::iota(group_ids.begin(), group_ids.end(), 0);
    seeded_shuffle(group_ids, cfg.seed, /*stream=*/2);
    packs.order.reserve(total);
    for (int64_t g : group_ids)
      append_batches(packs, sorted.data() + g * group, std::min(group, total - g * group), cfg.batch_size, W);
  } else {
    const Bins bins = best_fit_decreasing(sort_by_length(kept, len, longest, /*descending=*/true), len,
                                          cfg.max_tokens);
    // Balance: packs of similar cost share a step, so each step's slowest rank is close to its
    // mean. Sorting by cost and cutting into runs of world_size minimises the sum over steps of
    // the per-step maximum for equal-size groups (exchange argument).
    const int64_t num_bins = bins.packs.size();
    std::vector<double> key(num_bins);
    for (int64_t b = 0; b < num_bins; ++b)
      key[b] = cfg.balance == "tokens" ? static_cast<double>(bins.tokens[b])
                                       : bins.sum_sq[b] + a * static_cast<double>(bins.tokens[b]);
    std::vector<int64_t> by_cost(num_bins);
    std::iota(by_cost.begin(), by_cost.end(), 0);
    std::stable_sort(by_cost.begin(), by_cost.end(), [&](int64_t x, int64_t y) { return key[x] > key[y]; });
    while (by_cost.size() % W) by_cost.push_back(-1);  // idle ranks in the last step
    // Shuffle the order of steps, not their contents, so training does not see all long packs first.
    std::vector<int64_t> step_ids(by_cost.size() / W);
    std::iota(step_ids.begin(), step_ids.end(), 0);
    seeded_shuffle(step_ids, cfg.seed, /*stream=*/3);
    const Packs& bp = bins.packs;
    packs.order.reserve(bp.order.size());
    for (int64_t s : step_ids) {
      for (int64_t r = 0; r < W; ++r) {
        const int64_t b = by_cost[s * W + r];
        if (b >= 0) packs.order.insert(packs.order.end(), bp.order.begin() + bp.begin(b),
                                       bp.order.begin() + bp.end(b));
        packs.close();
      }
    }
  }

  res.num_steps = packs.size() / W;
  int64_t nonempty = 0;
  for (int64_t p = 0; p < packs.size(); ++p) {
    if (packs.begin(p) == packs.end(p)) continue;
    ++nonempty;
    int64_t tokens = 0, mx = 0;
    for (int64_t k = packs.begin(p); k < packs.end(p); ++k) {
      tokens += len[packs.order[k]];
      mx = std::max(mx, len[packs.order[k]]);
    }
    res.real_tokens += tokens;
    res.paid_tokens += padded ? (packs.end(p) - packs.begin(p)) * mx : cfg.max_tokens;
  }
  res.efficiency = res.paid_tokens ? static_cast<double>(res.real_tokens) / res.paid_tokens : 1.0;
  res.padding_ratio = 1.0 - res.efficiency;
  const StepStats mine = step_stats(packs, len, padded, a, W);
  res.imbalance = mine.imbalance;
  res.est_cost = mine.total;

  // Naive baseline under the same cost model: same world size, and as many sequences per
  // micro-batch as this plan has on average (or the batch size the caller named).
  int64_t naive_batch = cfg.batch_size;
  if (!cfg.batch_size_given && nonempty)
    naive_batch = std::max<int64_t>(1, (static_cast<int64_t>(kept.size()) + nonempty / 2) / nonempty);
  if (cfg.strategy == "naive" && naive_batch == cfg.batch_size) {
    res.est_speedup_vs_naive = 1.0;
  } else {
    const StepStats base = naive_step_stats(kept, naive_batch, W, cfg.seed, len, a);
    res.est_speedup_vs_naive = mine.total > 0 ? base.total / mine.total : 1.0;
  }
  res.order = std::move(packs.order);
  res.offsets = std::move(packs.offsets);
  return res;
}

}  // namespace longalign
