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

// The segment table split into contiguous blocks, validated and written by several host threads
// for large tables (one block below kParallelTableSegments segments), with per-block results.
struct TableBlocks {
  explicit TableBlocks(std::size_t segments)
      : n(segments),
        count(n < kParallelTableSegments
                  ? 1
                  : std::max<std::size_t>(1, std::min<std::size_t>(ThreadPool::default_threads(),
                                                                   n / (kParallelTableSegments / 2)))),
        info(count) {}

  // Segments [first, second) of block b.
  std::pair<std::size_t, std::size_t> range(std::size_t b) const { return {n * b / count, n * (b + 1) / count}; }

  // fn(b) for every block, on the pool's threads when there are several.
  void for_each(const std::function<void(std::size_t)>& fn) const {
    if (count == 1) {
      fn(0);
    } else {
      ThreadPool::global().run(count, static_cast<unsigned>(count), fn);
    }
  }

  std::size_t n;
  std::size_t count;
  std::vector<TableBlock> info;
};

struct Counts {
  std::uint64_t total = 0;     // bytes
  std::uint64_t nonempty = 0;  // segments with a length
};

// Pass 1: validate and count. A null, wrapping or overflowing segment raises std::invalid_argument
// naming it (checked_total); so do more than 2^32 - 1 non-empty segments.
Counts validate_and_count(const std::uint64_t* src, const std::uint64_t* dst, const std::uint64_t* lengths,
                          TableBlocks& blocks) {
  constexpr std::uint64_t kMax = ~std::uint64_t{0};
  blocks.for_each([&](std::size_t b) {
    const auto r = blocks.range(b);
    TableBlock& t = blocks.info[b];
    for (std::size_t i = r.first; i < r.second; ++i) {
      const std::uint64_t len = lengths[i];
      if (len == 0) continue;
      const std::uint64_t s = src[i], d = dst[i];
      if (s == 0 || d == 0 || len > kMax - s || len > kMax - d || len > kMax - t.total) t.bad = true;
      t.total += len;
      ++t.nonempty;
    }
  });
  Counts out;
  bool bad = false;
  for (const TableBlock& t : blocks.info) {
    bad = bad || t.bad || t.total > kMax - out.total;
    out.total += t.total;
    out.nonempty += t.nonempty;
  }
  if (bad) {
    checked_total("src_addrs", src, lengths, blocks.n);
    checked_total("dst_addrs", dst, lengths, blocks.n);
  }
  if (out.nonempty > 0xffffffffull) {
    throw std::invalid_argument("copy_segments supports at most 2^32 - 1 non-empty segments per call");
  }
  return out;
}

// How one launch covers the segments: chunk size, chunk count, grid bound, staging layout.
struct LaunchShape {
  unsigned chunk_shift = 14;
  std::uint64_t chunk_mask = 0;
  std::uint64_t total_chunks = 0;
  std::uint64_t max_ctas = 0;
  std::size_t table_bytes = 0;   // descriptor table ...
  std::size_t upload_bytes = 0;  // ... then the chunk -> segment map

  std::uint64_t chunks_of(std::uint64_t len) const { return (len >> chunk_shift) + ((len & chunk_mask) != 0); }
};

// Pass 2: the chunk size for `device`, then chunks per block and each block's first descriptor and chunk.
LaunchShape size_launch(const std::uint64_t* lengths, const Counts& counts, int device, TableBlocks& blocks) {
  LaunchShape shape;
  shape.max_ctas = static_cast<std::uint64_t>(sm_count(device)) * resident_ctas(device);
  // Two to four chunks per CTA for balance: a power of two in 16 KiB .. 4 MiB
  // (so chunk offsets keep 16-byte alignment and need no division).
  const std::uint64_t target = (counts.total + shape.max_ctas * 4 - 1) / (shape.max_ctas * 4);
  while ((std::uint64_t{1} << shape.chunk_shift) < target &&
         (std::uint64_t{1} << shape.chunk_shift) < kMaxChunkBytes) {
    ++shape.chunk_shift;
  }
  shape.chunk_mask = (std::uint64_t{1} << shape.chunk_shift) - 1;
  blocks.for_each([&](std::size_t b) {
    const auto r = blocks.range(b);
    std::uint64_t c = 0;
    for (std::size_t i = r.first; i < r.second; ++i) c += shape.chunks_of(lengths[i]);
    blocks.info[b].chunks = c;
  });
  std::uint64_t first_desc = 0;
  for (TableBlock& t : blocks.info) {
    t.first_desc = first_desc;
    t.first_chunk = shape.total_chunks;
    first_desc += t.nonempty;
    shape.total_chunks += t.chunks;
  }
  shape.table_bytes = static_cast<std::size_t>(counts.nonempty) * sizeof(SegmentDesc);
  shape.upload_bytes = shape.table_bytes + static_cast<std::size_t>(shape.total_chunks) * sizeof(std::uint32_t);
  return shape;
}

// The next pinned staging slot of `cache`, free to overwrite and at least `bytes` large, and a
// device buffer of at least `bytes` (cache.mu held).
StreamCache::Slot& reserve_staging(StreamCache& cache, std::size_t bytes, cudaStream_t stream) {
  StreamCache::Slot& slot = cache.slots[cache.next];
  cache.next = (cache.next + 1) % kStagingSlots;
  if (slot.uploaded == nullptr) {
    LLUMNIX_CUDA_CHECK(cudaEventCreateWithFlags(&slot.uploaded, cudaEventDisableTiming));
  }
  if (slot.pending) {
    // The previous upload from this slot must have been read before the
    // host overwrites it.
    LLUMNIX_CUDA_CHECK(cudaEventSynchronize(slot.uploaded));
    slot.pending = false;
  }
  if (slot.capacity < bytes) {
    if (slot.host != nullptr) {
      LLUMNIX_CUDA_CHECK(cudaFreeHost(slot.host));
      slot.host = nullptr;
      slot.capacity = 0;
    }
    const std::size_t cap = std::max<std::size_t>(bytes + bytes / 2, 4096);
    LLUMNIX_CUDA_CHECK(cudaHostAlloc(&slot.host, cap, cudaHostAllocPortable));
    slot.capacity = cap;
  }
  if (cache.device_capacity < bytes) {
    if (cache.device_buf != nullptr) {
      // Earlier launches on this stream may still read the old table.
      LLUMNIX_CUDA_CHECK(cudaStreamSynchronize(stream));
      LLUMNIX_CUDA_CHECK(cudaFree(cache.device_buf));
      cache.device_buf = nullptr;
      cache.device_capacity = 0;
    }
    const std::size_t cap = std::max<std::size_t>(std::max(bytes, 2 * cache.device_capacity), 4096);
    LLUMNIX_CUDA_CHECK(cudaMalloc(&cache.device_buf, cap));
    cache.device_capacity = cap;
  }
  return slot;
}

// The descriptor table and chunk map as the kernel reads them.
struct DeviceTable {
  const SegmentDesc* descs;
  const std::uint32_t* chunk_seg;
};

// Pass 3: write descriptors and the chunk map into a staging slot, then queue their upload on
// `stream` (cache.mu held).
DeviceTable stage_table(StreamCache& cache, const std::uint64_t* src, const std::uint64_t* dst,
                        const std::uint64_t* lengths, const TableBlocks& blocks, const LaunchShape& shape,
                        cudaStream_t stream) {
  StreamCache::Slot& slot = reserve_staging(cache, shape.upload_bytes, stream);
  auto* table = static_cast<SegmentDesc*>(slot.host);
  auto* chunk_seg = reinterpret_cast<std::uint32_t*>(static_cast<char*>(slot.host) + shape.table_bytes);
  blocks.for_each([&](std::size_t b) {
    const auto r = blocks.range(b);
    std::uint64_t k = blocks.info[b].first_desc, c = blocks.info[b].first_chunk;
    for (std::size_t i = r.first; i < r.second; ++i) {
      const std::uint64_t len = lengths[i];
      if (len == 0) continue;
      SegmentDesc& desc = table[k];
      desc.src = src[i];
      desc.dst = dst[i];
      desc.len = len;
      desc.first_chunk = c;
      const std::uint64_t end = c + shape.chunks_of(len);
      for (; c < end; ++c) chunk_seg[c] = static_cast<std::uint32_t>(k);
      ++k;
    }
  });

  LLUMNIX_CUDA_CHECK(
      cudaMemcpyAsync(cache.device_buf, slot.host, shape.upload_bytes, cudaMemcpyHostToDevice, stream));
  LLUMNIX_CUDA_CHECK(cudaEventRecord(slot.uploaded, stream));
  slot.pending = true;
  return {static_cast<const SegmentDesc*>(cache.device_buf),
          reinterpret_cast<const std::uint32_t*>(static_cast<const char*>(cache.device_buf) + shape.table_bytes)};
}

// One kernel over every chunk, the grid bounded by the CTAs resident at once.
void launch(const DeviceTable& table, const LaunchShape& shape, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(std::min<std::uint64_t>(shape.total_chunks, shape.max_ctas));
  copy_segments_kernel<<<grid, kThreads, 0, stream>>>(table.descs, table.chunk_seg, shape.total_chunks,
                                                      shape.chunk_shift);
  LLUMNIX_CUDA_CHECK(cudaGetLastError());
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
  TableBlocks blocks(n);
  const Counts counts = validate_and_count(src, dst, lengths, blocks);
  if (counts.nonempty == 0) return;

  int device = 0;
  LLUMNIX_CUDA_CHECK(cudaGetDevice(&device));
  const LaunchShape shape = size_launch(lengths, counts, device, blocks);

  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  std::shared_ptr<StreamCache> cache = cache_for(device, stream_handle);
  // Held until the kernel is queued: no other call may reuse the staging slot or device buffer first.
  std::lock_guard<std::mutex> lock(cache->mu);
  const DeviceTable table = stage_table(*cache, src, dst, lengths, blocks, shape, stream);
  launch(table, shape, stream);
}

}  // namespace cuda
}  // namespace llumnix_kv
