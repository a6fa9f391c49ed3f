// CUDA position synthesis. Takes raw device pointers and a stream (no torch headers); Python
// calls it through ctypes with tensor data_ptr()s and the current stream.
// "logo" and "contiguous": one pass, one thread per token: find the sequence by binary search
// over cu_seqlens, draw the chunk's offset from the counter-based hash, write the id.
// "pose": offsets form a chain, so one thread per sequence first writes them into a scratch
// table, then the same token pass reads them. No host round trip in either case.
#include <cuda_runtime.h>

#include <cstdint>

#include "positions.h"

namespace {

using namespace longalign;

__global__ void chunk_offsets_kernel(const int32_t* __restrict__ cu, const int64_t* __restrict__ target,
                                     const int64_t* __restrict__ chunk_base, int64_t B, int method, uint64_t seed,
                                     int64_t* __restrict__ scratch) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < B;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = static_cast<int64_t>(cu[i + 1]) - cu[i];
    const int64_t N = chunk_base[i + 1] - chunk_base[i];
    sequence_chunk_offsets(method, seed, i, N, target[i] - n, scratch + chunk_base[i]);
  }
}

template <bool FROM_TABLE>
__global__ void token_positions_kernel(const int32_t* __restrict__ cu, const int64_t* __restrict__ target,
                                       const int64_t* __restrict__ prefix, const int64_t* __restrict__ suffix,
                                       const int64_t* __restrict__ chunk_base, const int64_t* __restrict__ scratch,
                                       int64_t B, int64_t total, int method, int64_t chunk_size, int64_t num_chunks,
                                       uint64_t seed, int64_t* __restrict__ out) {
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < total;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // last i with cu[i] <= g; zero-length sequences share a start, so take the last one
    int64_t lo = 0, hi = B - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) >> 1;
      if (cu[mid] <= g) lo = mid; else hi = mid - 1;
    }
    const int64_t start = cu[lo], n = static_cast<int64_t>(cu[lo + 1]) - start;
    const int64_t s = prefix ? prefix[lo] : 0, q = suffix ? suffix[lo] : 0;
    if (FROM_TABLE) {
      out[g] = token_position(g - start, n, s, q, chunk_size, num_chunks, TableOffsets{scratch + chunk_base[lo]});
    } else {
      const HashOffsets hash{method, seed, lo, middle_chunk_count(n - s - q, chunk_size, num_chunks), target[lo] - n};
      out[g] = token_position(g - start, n, s, q, chunk_size, num_chunks, hash);
    }
  }
}

}  // namespace

extern "C" int longalign_synthesize_positions_cuda(const int32_t* cu_seqlens, const int64_t* target_len,
                                                    const int64_t* prefix, const int64_t* suffix,
                                                    const int64_t* chunk_base, int64_t* scratch, int64_t B,
                                                    int64_t total, int method, int64_t chunk_size,
                                                    int64_t num_chunks, uint64_t seed, int64_t* out,
                                                    void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool from_table = method == kPose;  // chunk_base and scratch are only read for "pose"
  if (from_table && B > 0) {
    const int threads = 128;
    const int64_t blocks = (B + threads - 1) / threads;
    chunk_offsets_kernel<<<static_cast<unsigned>(blocks < 65535 ? blocks : 65535), threads, 0, st>>>(
        cu_seqlens, target_len, chunk_base, B, method, seed, scratch);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  if (total > 0) {
    const int threads = 256;
    const int64_t blocks = (total + threads - 1) / threads;
    const unsigned grid = static_cast<unsigned>(blocks < 1048576 ? blocks : 1048576);
    if (from_table)
      token_positions_kernel<true><<<grid, threads, 0, st>>>(cu_seqlens, target_len, prefix, suffix, chunk_base,
                                                             scratch, B, total, method, chunk_size, num_chunks, seed,
                                                             out);
    else
      token_positions_kernel<false><<<grid, threads, 0, st>>>(cu_seqlens, target_len, prefix, suffix, nullptr,
                                                              nullptr, B, total, method, chunk_size, num_chunks, seed,
                                                              out);
  }
  return static_cast<int>(cudaGetLastError());
}

extern "C" const char* longalign_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
