// LOGO / PoSE position synthesis: the placement arithmetic and the random draws, defined once
// for the C++ CPU twin (positions_cpu.cpp) and the CUDA kernel (positions_cuda.cu), so both give
// bitwise the same ids. All arithmetic is integer: nothing here can round differently on a GPU.
//
// For sequence i of length n with prefix s and suffix q, the middle c = n - s - q tokens are cut
// into N chunks; chunk j (first token a_j) gets positions a_j + o_j, ...; the suffix follows the
// last chunk contiguously. Offsets lie in [0, G] with G = target_len - n and never decrease.
#pragma once
#include <cstdint>

#include "../common/hash.h"

namespace longalign {

enum PositionMethod : int { kContiguous = 0, kLogo = 1, kPose = 2 };

// Number of middle chunks: fixed-size chunks of `chunk_size`, or, when num_chunks > 0,
// near-equal chunks with empty ones dropped.
LA_HD int64_t middle_chunk_count(int64_t c, int64_t chunk_size, int64_t num_chunks) {
  if (c <= 0) return 0;
  if (num_chunks > 0) return num_chunks < c ? num_chunks : c;
  return (c + chunk_size - 1) / chunk_size;
}

// Chunk index of middle token m (0 <= m < c), given N from middle_chunk_count.
LA_HD int64_t chunk_of_middle_token(int64_t m, int64_t c, int64_t N, int64_t chunk_size, int64_t num_chunks) {
  if (num_chunks <= 0) return m / chunk_size;
  const int64_t base = c / N, rem = c % N;  // the first `rem` chunks hold base + 1 tokens
  const int64_t head = rem * (base + 1);
  return m < head ? m / (base + 1) : rem + (m - head) / base;
}

// Offset of chunk j given the previous chunk's offset. "logo": uniform in its slot
// [floor(jG/N), floor((j+1)G/N)], slots tile [0, G] so offsets never decrease.
// "pose": 0 for chunk 0, then uniform in [previous, G].
LA_HD int64_t next_chunk_offset(int method, uint64_t seed, int64_t seq, int64_t j, int64_t N, int64_t G,
                                int64_t prev) {
  if (method == kContiguous || G <= 0) return 0;
  const uint64_t h = hash3(seed, static_cast<uint64_t>(seq), static_cast<uint64_t>(j));
  if (method == kLogo) return uniform_int(h, (j * G) / N, ((j + 1) * G) / N);
  return j == 0 ? 0 : uniform_int(h, prev, G);
}

// Writes the N chunk offsets of one sequence (sequential: "pose" is a chain).
LA_HD void sequence_chunk_offsets(int method, uint64_t seed, int64_t seq, int64_t N, int64_t G, int64_t* out) {
  int64_t prev = 0;
  for (int64_t j = 0; j < N; ++j) {
    prev = next_chunk_offset(method, seed, seq, j, N, G, prev);
    out[j] = prev;
  }
}

// Where token_position gets chunk j's offset: a table filled by sequence_chunk_offsets (needed
// for "pose", whose offsets form a chain), or drawn on the spot for "logo" and "contiguous",
// whose offset of chunk j depends on (seed, sequence, j) alone: one pass, no table.
struct TableOffsets {
  const int64_t* table;
  LA_HD int64_t operator()(int64_t j) const { return table[j]; }
};

struct HashOffsets {
  int method;
  uint64_t seed;
  int64_t seq, N, G;
  LA_HD int64_t operator()(int64_t j) const { return next_chunk_offset(method, seed, seq, j, N, G, 0); }
};

// Position id of token t (0 <= t < n) of a sequence whose chunk offsets `offset(j)` gives.
template <typename Offsets>
LA_HD int64_t token_position(int64_t t, int64_t n, int64_t s, int64_t q, int64_t chunk_size, int64_t num_chunks,
                             const Offsets& offset) {
  const int64_t c = n - s - q;
  if (t < s || c <= 0) return t;
  const int64_t N = middle_chunk_count(c, chunk_size, num_chunks);
  const int64_t m = t - s;
  if (m < c) return t + offset(chunk_of_middle_token(m, c, N, chunk_size, num_chunks));
  return t + offset(N - 1);  // suffix: right after the last chunk
}

}  // namespace longalign
