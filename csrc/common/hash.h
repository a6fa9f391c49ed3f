// Counter-based hashing shared by the packer (seeded shuffles) and position synthesis
// (per-chunk offsets). One definition for host and device, so the C++ CPU twin and the CUDA
// kernel draw bitwise the same numbers; std:: distributions are implementation-defined and
// would not be reproducible across machines.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define LA_HD __host__ __device__ __forceinline__
#else
#define LA_HD inline
#endif

namespace longalign {

// splitmix64 finaliser: a bijection on 64 bits with full avalanche.
LA_HD uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Hash of (seed, a, b): chained so that (1, 2) and (2, 1) differ. hash3(seed, a, b) ==
// mix64(hash_prefix(seed, a) ^ b), so loops over b hoist the prefix.
LA_HD uint64_t hash_prefix(uint64_t seed, uint64_t a) { return mix64(mix64(seed) ^ a); }
LA_HD uint64_t hash3(uint64_t seed, uint64_t a, uint64_t b) { return mix64(hash_prefix(seed, a) ^ b); }

// High 64 bits of a 64x64 product, the same on host and device.
LA_HD uint64_t mulhi64(uint64_t a, uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(a, b);
#else
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#endif
}

// Uniform integer in [lo, hi] (hi >= lo) by multiply-high (Lemire): no division, and a bias
// below range / 2^64.
LA_HD int64_t uniform_int(uint64_t h, int64_t lo, int64_t hi) {
  return lo + static_cast<int64_t>(mulhi64(h, static_cast<uint64_t>(hi - lo) + 1));
}

}  // namespace longalign
