// One-launch copy of many scattered segments (device, peer-mapped or pinned
// host memory), plus the host code that builds and uploads the descriptor
// table for it.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <utility>
#include <vector>

#include "check.cuh"
#include "llumnix_kv/cuda_ops.h"
#include "llumnix_kv/segments.h"
#include "llumnix_kv/thread_pool.h"

namespace llumnix_kv {
namespace cuda {

namespace {

// One non-empty segment; chunks [first_chunk, first_chunk + ceil(len /
// 2^chunk_shift)) of the launch belong to it.
struct alignas(16) SegmentDesc {
  std::uint64_t src;
  std::uint64_t dst;
  std::uint64_t len;
  std::uint64_t first_chunk;
};

#ifndef LLUMNIX_KV_COPY_THREADS
#define LLUMNIX_KV_COPY_THREADS 256
#endif
// Threads per CTA, and at most this many CTAs per SM (2048 threads); the grid is sized to the
// CTAs that are resident at once (see resident_ctas), so that no CTA waits for a second wave.
constexpr int kThreads = LLUMNIX_KV_COPY_THREADS;
constexpr int kCtasPerSm = 2048 / kThreads;
constexpr int kUnroll = 4;
constexpr std::uint64_t kMaxChunkBytes = 4ull << 20;  // bounds one CTA's work item
constexpr int kStagingSlots = 4;
// From this many segments on, the host builds the descriptor table with
// several threads, each taking at least half as many (below that, waking
// threads costs more than it saves).
constexpr std::size_t kParallelTableSegments = 32768;

// Per-block results of the host passes over the segment table.
struct TableBlock {
  std::uint64_t total = 0;
  std::uint64_t nonempty = 0;
  std::uint64_t chunks = 0;
  std::uint64_t first_desc = 0;
  std::uint64_t first_chunk = 0;
  bool bad = false;
};

// Copies n bytes with W-byte vector accesses; s and d are congruent mod W.
template <typename V>
__device__ __forceinline__ void copy_vectors(const unsigned char* s, unsigned char* d, std::uint64_t n) {
  constexpr std::uint64_t W = sizeof(V);
  const std::uint64_t tid = threadIdx.x;
  const std::uint64_t stride = blockDim.x;
  std::uint64_t head = (W - (reinterpret_cast<std::uintptr_t>(s) & (W - 1))) & (W - 1);
  if (head > n) head = n;
  for (std::uint64_t i = tid; i < head; i += stride) d[i] = s[i];
  s += head;
  d += head;
  n -= head;
  const std::uint64_t nv = n / W;
  const V* __restrict__ sv = reinterpret_cast<const V*>(s);
  V* __restrict__ dv = reinterpret_cast<V*>(d);
  std::uint64_t i = tid;
  for (; i + (kUnroll - 1) * stride < nv; i += kUnroll * stride) {
    V r[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) r[u] = sv[i + u * stride];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) dv[i + u * stride] = r[u];
  }
  for (; i < nv; i += stride) dv[i] = sv[i];
  const std::uint64_t done = nv * W;
  for (std::uint64_t j = done + tid; j < n; j += stride) d[j] = s[j];
}

__device__ __forceinline__ void copy_range(const unsigned char* s, unsigned char* d, std::uint64_t n) {
  const std::uintptr_t mis = reinterpret_cast<std::uintptr_t>(s) ^ reinterpret_cast<std::uintptr_t>(d);
  if ((mis & 15) == 0) {
    copy_vectors<uint4>(s, d, n);
  } else if ((mis & 7) == 0) {
    copy_vectors<uint2>(s, d, n);
  } else if ((mis & 3) == 0) {
    copy_vectors<unsigned int>(s, d, n);
  } else {
    copy_vectors<unsigned char>(s, d, n);
  }
}

// Grid-stride over all chunks of all segments: each CTA takes one chunk at a
// time, so a large segment is spread over many CTAs and each small one costs
// one chunk. chunk_seg[w] names the segment of chunk w (no search), and the
// next chunk's descriptor is fetched before the current chunk is copied so
// that its latency overlaps the copy.
__global__ void __launch_bounds__(kThreads)
    copy_segments_kernel(const SegmentDesc* __restrict__ descs, const std::uint32_t* __restrict__ chunk_seg,
                         std::uint64_t total_chunks, unsigned chunk_shift) {
  std::uint64_t w = blockIdx.x;
  if (w >= total_chunks) return;
  SegmentDesc cur = descs[chunk_seg[w]];
  for (;;) {
    const std::uint64_t next_w = w + gridDim.x;
    const bool more = next_w < total_chunks;
    SegmentDesc next;
    if (more) next = descs[chunk_seg[next_w]];
    const std::uint64_t off = (w - cur.first_chunk) << chunk_shift;
    const std::uint64_t len = min(std::uint64_t{1} << chunk_shift, cur.len - off);
    copy_range(reinterpret_cast<const unsigned char*>(cur.src) + off, reinterpret_cast<unsigned char*>(cur.dst) + off,
               len);
    if (!more) break;
    cur = next;
    w = next_w;
  }
}

int sm_count(int device) {
  static std::mutex mu;
  static std::map<int, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  int sms = 0;
  LLUMNIX_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (sms <= 0) sms = 1;
  cache.emplace(device, sms);
  return sms;
}

// CTAs of the copy kernel resident on one SM of `device` (its registers limit it below kCtasPerSm).
int resident_ctas(int device) {
  static std::mutex mu;
  static std::map<int, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  int n = 0;
  LLUMNIX_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, copy_segments_kernel, kThreads, 0));
  n = std::max(1, std::min(n, kCtasPerSm));
  cache.emplace(device, n);
  return n;
}

// Per (device, stream): a device buffer for descriptor tables and a ring of
// pinned host staging buffers, each reusable once its upload has run.
struct StreamCache {
  struct Slot {
    void* host = nullptr;
    std::size_t capacity = 0;
    cudaEvent_t uploaded = nullptr;
    bool pending = false;
  };
  std::mutex mu;
  void* device_buf = nullptr;
  std::size_t device_capacity = 0;
  Slot slots[kStagingSlots];
  int next = 0;
};

std::mutex g_cache_mu;
// Never destroyed: freeing CUDA memory during interpreter shutdown can run
// after the CUDA runtime has been torn down.
auto* g_caches = new std::map<std::pair<int, std::uintptr_t>, std::shared_ptr<StreamCache>>();

std::shared_ptr<StreamCache> cache_for(int device, std::uintptr_t stream) {
  std::lock_guard<std::mutex> lock(g_cache_mu);
  auto& entry = (*g_caches)[{device, stream}];
  if (!entry) entry = std::make_shared<StreamCache>();
  return entry;
}

void free_cache(StreamCache& c) {
  for (auto& slot : c.slots) {
    if (slot.uploaded != nullptr) cudaEventSynchronize(slot.uploaded);
    if (slot.host != nullptr) cudaFreeHost(slot.host);
    if (slot.uploaded != nullptr) cudaEventDestroy(slot.uploaded);
    slot = StreamCache::Slot();
  }
  if (c.device_buf != nullptr) cudaFree(c.device_buf);
  c.device_buf = nullptr;
  c.device_capacity = 0;
}

}  // namespace

void release_stream_cache(std::uintptr_t stream) {
  std::vector<std::shared_ptr<StreamCache>> victims;
  {
    std::lock_guard<std::mutex> lock(g_cache_mu);
    for (auto it = g_caches->begin(); it != g_caches->end();) {
      if (it->first.second == stream) {
        victims.push_back(it->second);
        it = g_caches->erase(it);
      } else {
        ++it;
      }
    }
  }
  if (victims.empty()) return;
  LLUMNIX_CUDA_CHECK(cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream)));
  for (auto& c : victims) {
    std::lock_guard<std::mutex> lock(c->mu);
    free_cache(*c);
  }
}

void copy_segments(const std::uint64_t* src, const std::uint64_t* dst, const std::uint64_t* lengths, std::size_t n,
                   std::uintptr_t stream_handle) {
  if (n == 0) return;
  // Large tables are validated and written by several host threads, each
  // over one contiguous block of segments.
  const std::size_t blocks =
      n < kParallelTableSegments ? 1
                                 : std::max<std::size_t>(1, std::min<std::size_t>(ThreadPool::default_threads(),
                                                                                  n / (kParallelTableSegments / 2)));
  std::vector<TableBlock> info(blocks);
  auto block_range = [&](std::size_t b) { return std::make_pair(n * b / blocks, n * (b + 1) / blocks); };
  auto for_blocks = [&](const std::function<void(std::size_t)>& fn) {
    if (blocks == 1) {
      fn(0);
    } else {
      ThreadPool::global().run(blocks, static_cast<unsigned>(blocks), fn);
    }
  };

  // Pass 1: validate and count. On a bad segment, checked_total names it.
  constexpr std::uint64_t kMax = ~std::uint64_t{0};
  for_blocks([&](std::size_t b) {
    const auto r = block_range(b);
    TableBlock& t = info[b];
    for (std::size_t i = r.first; i < r.second; ++i) {
      const std::uint64_t len = lengths[i];
      if (len == 0) continue;
      const std::uint64_t s = src[i], d = dst[i];
      if (s == 0 || d == 0 || len > kMax - s || len > kMax - d || len > kMax - t.total) t.bad = true;
      t.total += len;
      ++t.nonempty;
    }
  });
  std::uint64_t total = 0, nonempty = 0;
  bool bad = false;
  for (const TableBlock& t : info) {
    bad = bad || t.bad || t.total > kMax - total;
    total += t.total;
    nonempty += t.nonempty;
  }
  if (bad) {
    checked_total("src_addrs", src, lengths, n);
    checked_total("dst_addrs", dst, lengths, n);
  }
  if (nonempty == 0) return;
  if (nonempty > 0xffffffffull) {
    throw std::invalid_argument("copy_segments supports at most 2^32 - 1 non-empty segments per call");
  }

  int device = 0;
  LLUMNIX_CUDA_CHECK(cudaGetDevice(&device));
  const std::uint64_t max_ctas = static_cast<std::uint64_t>(sm_count(device)) * resident_ctas(device);

  // Two to four chunks per CTA for balance: a power of two in 16 KiB .. 4 MiB
  // (so chunk offsets keep 16-byte alignment and need no division).
  const std::uint64_t target = (total + max_ctas * 4 - 1) / (max_ctas * 4);
  unsigned chunk_shift = 14;
  while ((std::uint64_t{1} << chunk_shift) < target && (std::uint64_t{1} << chunk_shift) < kMaxChunkBytes) {
    ++chunk_shift;
  }
  const std::uint64_t chunk_mask = (std::uint64_t{1} << chunk_shift) - 1;
  auto chunks_of = [&](std::uint64_t len) { return (len >> chunk_shift) + ((len & chunk_mask) != 0); };

  // Pass 2: chunks per block, then each block's first descriptor and chunk.
  for_blocks([&](std::size_t b) {
    const auto r = block_range(b);
    std::uint64_t c = 0;
    for (std::size_t i = r.first; i < r.second; ++i) c += chunks_of(lengths[i]);
    info[b].chunks = c;
  });
  std::uint64_t total_chunks = 0, first_desc = 0;
  for (TableBlock& t : info) {
    t.first_desc = first_desc;
    t.first_chunk = total_chunks;
    first_desc += t.nonempty;
    total_chunks += t.chunks;
  }

  // Staging layout: descriptor table, then the chunk -> segment map.
  const std::size_t table_bytes = static_cast<std::size_t>(nonempty) * sizeof(SegmentDesc);
  const std::size_t upload_bytes = table_bytes + static_cast<std::size_t>(total_chunks) * sizeof(std::uint32_t);

  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  std::shared_ptr<StreamCache> cache = cache_for(device, stream_handle);
  std::lock_guard<std::mutex> lock(cache->mu);

  StreamCache::Slot& slot = cache->slots[cache->next];
  cache->next = (cache->next + 1) % kStagingSlots;
  if (slot.uploaded == nullptr) {
    LLUMNIX_CUDA_CHECK(cudaEventCreateWithFlags(&slot.uploaded, cudaEventDisableTiming));
  }
  if (slot.pending) {
    // The previous upload from this slot must have been read before the
    // host overwrites it.
    LLUMNIX_CUDA_CHECK(cudaEventSynchronize(slot.uploaded));
    slot.pending = false;
  }
  if (slot.capacity < upload_bytes) {
    if (slot.host != nullptr) {
      LLUMNIX_CUDA_CHECK(cudaFreeHost(slot.host));
      slot.host = nullptr;
      slot.capacity = 0;
    }
    const std::size_t cap = std::max<std::size_t>(upload_bytes + upload_bytes / 2, 4096);
    LLUMNIX_CUDA_CHECK(cudaHostAlloc(&slot.host, cap, cudaHostAllocPortable));
    slot.capacity = cap;
  }
  if (cache->device_capacity < upload_bytes) {
    if (cache->device_buf != nullptr) {
      // Earlier launches on this stream may still read the old table.
      LLUMNIX_CUDA_CHECK(cudaStreamSynchronize(stream));
      LLUMNIX_CUDA_CHECK(cudaFree(cache->device_buf));
      cache->device_buf = nullptr;
      cache->device_capacity = 0;
    }
    const std::size_t cap = std::max<std::size_t>(std::max(upload_bytes, 2 * cache->device_capacity), 4096);
    LLUMNIX_CUDA_CHECK(cudaMalloc(&cache->device_buf, cap));
    cache->device_capacity = cap;
  }

  // Pass 3: write descriptors and the chunk map.
  auto* table = static_cast<SegmentDesc*>(slot.host);
  auto* chunk_seg = reinterpret_cast<std::uint32_t*>(static_cast<char*>(slot.host) + table_bytes);
  for_blocks([&](std::size_t b) {
    const auto r = block_range(b);
    std::uint64_t k = info[b].first_desc, c = info[b].first_chunk;
    for (std::size_t i = r.first; i < r.second; ++i) {
      const std::uint64_t len = lengths[i];
      if (len == 0) continue;
      SegmentDesc& desc = table[k];
      desc.src = src[i];
      desc.dst = dst[i];
      desc.len = len;
      desc.first_chunk = c;
      const std::uint64_t end = c + chunks_of(len);
      for (; c < end; ++c) chunk_seg[c] = static_cast<std::uint32_t>(k);
      ++k;
    }
  });

  LLUMNIX_CUDA_CHECK(cudaMemcpyAsync(cache->device_buf, slot.host, upload_bytes, cudaMemcpyHostToDevice, stream));
  LLUMNIX_CUDA_CHECK(cudaEventRecord(slot.uploaded, stream));
  slot.pending = true;

  const auto* dev_table = static_cast<const SegmentDesc*>(cache->device_buf);
  const auto* dev_chunk_seg =
      reinterpret_cast<const std::uint32_t*>(static_cast<const char*>(cache->device_buf) + table_bytes);
  const unsigned grid = static_cast<unsigned>(std::min<std::uint64_t>(total_chunks, max_ctas));
  copy_segments_kernel<<<grid, kThreads, 0, stream>>>(dev_table, dev_chunk_seg, total_chunks, chunk_shift);
  LLUMNIX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace cuda
}  // namespace llumnix_kv
