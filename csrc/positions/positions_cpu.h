#pragma once
#include <cstdint>
#include <vector>

namespace longalign {

// Chunk-table offsets: entry i is where sequence i's chunk offsets start (B + 1 entries).
// The CUDA path uses it to size and index its scratch table.
std::vector<int64_t> positions_chunk_base(const int32_t* cu_seqlens, int64_t B, const int64_t* prefix,
                                          const int64_t* suffix, int64_t chunk_size, int64_t num_chunks);

// The CPU twin. Inputs are assumed validated (the Python layer does it on the host); the checks
// here only guard memory safety and throw std::invalid_argument. By default every sequence
// fills a table of chunk offsets (one hash per chunk: fastest on a CPU); `one_pass` runs the
// CUDA kernel's path instead ("logo" and "contiguous" draw each token's chunk offset on the
// spot), so the tests can hold the GPU's algorithm to the same bits on a machine without one.
void synthesize_positions_cpu(const int32_t* cu_seqlens, int64_t B, const int64_t* target_len,
                              const int64_t* prefix, const int64_t* suffix, int method, int64_t chunk_size,
                              int64_t num_chunks, uint64_t seed, int64_t* out, bool one_pass = false);

}  // namespace longalign
