// Per-request stage of the plan compiler: a block template broadcast over block pairs, coalesced.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace llumnix_kv {

struct SegmentList {
  std::vector<std::uint64_t> src;
  std::vector<std::uint64_t> dst;
  std::vector<std::uint64_t> len;
};

// For every block pair i (in order) and template entry j (in order), the segment
//   src_blocks[i] * src_stride + tpl_src[j]  ->  dst_blocks[i] * dst_stride + tpl_dst[j],  tpl_len[j] bytes,
// with each segment merged into the previous one when it continues it on both sides.
// Throws InvalidArgument for a block id outside [0, num_blocks) (naming the side and index) or
// a negative stride/offset.
SegmentList plan_segments(const std::int64_t* src_blocks, const std::int64_t* dst_blocks, std::size_t n_blocks,
                          std::int64_t src_stride, std::int64_t dst_stride, std::int64_t src_num_blocks,
                          std::int64_t dst_num_blocks, const std::int64_t* tpl_src, const std::int64_t* tpl_dst,
                          const std::int64_t* tpl_len, std::size_t n_tpl);

}  // namespace llumnix_kv
