// CUDA position synthesis. Takes raw device pointers and a stream (no torch headers); Python
// calls it through ctypes with tensor data_ptr()s and the current stream.
// Two launches, no host round trip: (1) one thread per sequence writes its chunk offsets into a
// scratch table ("pose" offsets form a chain, so they are sequential per sequence); (2) one
// thread per token finds its sequence by binary search over cu_seqlens and writes its id.
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

__global__ void token_positions_kernel(const int32_t* __restrict__ cu, const int64_t* __restrict__ prefix,
                                       const int64_t* __restrict__ suffix, const int64_t* __restrict__ chunk_base,
                                       const int64_t* __restrict__ scratch, int64_t B, int64_t total,
                                       int64_t chunk_size, int64_t num_chunks, int64_t* __restrict__ out) {
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
    out[g] = token_position(g - start, n, s, q, chunk_size, num_chunks, scratch + chunk_base[lo]);
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
  if (B > 0) {
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
    token_positions_kernel<<<static_cast<unsigned>(blocks < 1048576 ? blocks : 1048576), threads, 0, st>>>(
        cu_seqlens, prefix, suffix, chunk_base, scratch, B, total, chunk_size, num_chunks, out);
  }
  return static_cast<int>(cudaGetLastError());
}

extern "C" const char* longalign_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
