#pragma once
#include <cstdint>
#include <vector>

namespace longalign {

// Chunk-table offsets: entry i is where sequence i's chunk offsets start (B + 1 entries).
// The CUDA path uses it to size and index its scratch table.
std::vector<int64_t> positions_chunk_base(const int32_t* cu_seqlens, int64_t B, const int64_t* prefix,
                                          const int64_t* suffix, int64_t chunk_size, int64_t num_chunks);

// The CPU twin. Inputs are assumed validated (the Python layer does it on the host); the checks
// here only guard memory safety and throw std::invalid_argument.
void synthesize_positions_cpu(const int32_t* cu_seqlens, int64_t B, const int64_t* target_len,
                              const int64_t* prefix, const int64_t* suffix, int method, int64_t chunk_size,
                              int64_t num_chunks, uint64_t seed, int64_t* out);

}  // namespace longalign
