#include "positions_cpu.h"

#include <stdexcept>
#include <string>

#include "positions.h"

namespace longalign {

std::vector<int64_t> positions_chunk_base(const int32_t* cu, int64_t B, const int64_t* prefix, const int64_t* suffix,
                                          int64_t chunk_size, int64_t num_chunks) {
  std::vector<int64_t> base(B + 1, 0);
  for (int64_t i = 0; i < B; ++i) {
    const int64_t n = static_cast<int64_t>(cu[i + 1]) - cu[i];
    const int64_t c = n - (prefix ? prefix[i] : 0) - (suffix ? suffix[i] : 0);
    base[i + 1] = base[i] + middle_chunk_count(c, chunk_size, num_chunks);
  }
  return base;
}

void synthesize_positions_cpu(const int32_t* cu, int64_t B, const int64_t* target_len, const int64_t* prefix,
                              const int64_t* suffix, int method, int64_t chunk_size, int64_t num_chunks,
                              uint64_t seed, int64_t* out, bool one_pass) {
  if (chunk_size < 1 && num_chunks < 1) throw std::invalid_argument("chunk_size must be >= 1");
  std::vector<int64_t> offsets;
  for (int64_t i = 0; i < B; ++i) {
    const int64_t start = cu[i], n = static_cast<int64_t>(cu[i + 1]) - cu[i];
    const int64_t s = prefix ? prefix[i] : 0, q = suffix ? suffix[i] : 0;
    if (n < 0 || s < 0 || q < 0 || (n > 0 && s + q > n) || target_len[i] < n)
      throw std::invalid_argument("synthesize_positions: invalid layout for sequence " + std::to_string(i));
    const int64_t N = middle_chunk_count(n - s - q, chunk_size, num_chunks);
    const int64_t G = target_len[i] - n;
    if (method == kPose || !one_pass) {  // a table per sequence: one hash per chunk, not per token
      offsets.resize(N > 0 ? N : 1);
      sequence_chunk_offsets(method, seed, i, N, G, offsets.data());
      const TableOffsets table{offsets.data()};
      for (int64_t t = 0; t < n; ++t) out[start + t] = token_position(t, n, s, q, chunk_size, num_chunks, table);
    } else {  // the CUDA kernel's one-pass path (offsets drawn per token), for the tests
      const HashOffsets hash{method, seed, i, N, G};
      for (int64_t t = 0; t < n; ++t) out[start + t] = token_position(t, n, s, q, chunk_size, num_chunks, hash);
    }
  }
}

}  // namespace longalign
