// Per-request stage of the plan compiler (see include/llumnix_kv/plan.h and llumnix_kv_core/plan.py).
#include "llumnix_kv/plan.h"

#include <string>

#include "llumnix_kv/errors.h"

namespace llumnix_kv {

namespace {

void check_blocks(const char* side, const std::int64_t* blocks, std::size_t n, std::int64_t num_blocks) {
  for (std::size_t i = 0; i < n; ++i) {
    if (blocks[i] < 0 || blocks[i] >= num_blocks) {
      throw InvalidArgument(std::string(side) + " block id " + std::to_string(blocks[i]) + " at index " +
                            std::to_string(i) + " is out of range [0, " + std::to_string(num_blocks) + ")");
    }
  }
}

}  // namespace

SegmentList plan_segments(const std::int64_t* src_blocks, const std::int64_t* dst_blocks, std::size_t n_blocks,
                          std::int64_t src_stride, std::int64_t dst_stride, std::int64_t src_num_blocks,
                          std::int64_t dst_num_blocks, const std::int64_t* tpl_src, const std::int64_t* tpl_dst,
                          const std::int64_t* tpl_len, std::size_t n_tpl) {
  if (src_stride < 0 || dst_stride < 0) throw InvalidArgument("block strides must be >= 0");
  for (std::size_t j = 0; j < n_tpl; ++j) {
    if (tpl_src[j] < 0 || tpl_dst[j] < 0 || tpl_len[j] <= 0) {
      throw InvalidArgument("template entry " + std::to_string(j) + " has a negative offset or a length <= 0");
    }
  }
  check_blocks("source", src_blocks, n_blocks, src_num_blocks);
  check_blocks("destination", dst_blocks, n_blocks, dst_num_blocks);
  SegmentList out;
  if (n_blocks == 0 || n_tpl == 0) return out;
  const std::size_t cap = n_blocks * n_tpl;
  out.src.reserve(cap);
  out.dst.reserve(cap);
  out.len.reserve(cap);
  std::uint64_t ls = 0, ld = 0, ll = 0;
  bool open = false;
  for (std::size_t i = 0; i < n_blocks; ++i) {
    const std::uint64_t sb = static_cast<std::uint64_t>(src_blocks[i]) * static_cast<std::uint64_t>(src_stride);
    const std::uint64_t db = static_cast<std::uint64_t>(dst_blocks[i]) * static_cast<std::uint64_t>(dst_stride);
    for (std::size_t j = 0; j < n_tpl; ++j) {
      const std::uint64_t s = sb + static_cast<std::uint64_t>(tpl_src[j]);
      const std::uint64_t d = db + static_cast<std::uint64_t>(tpl_dst[j]);
      const std::uint64_t n = static_cast<std::uint64_t>(tpl_len[j]);
      if (open && s == ls + ll && d == ld + ll) {
        ll += n;
        continue;
      }
      if (open) {
        out.src.push_back(ls);
        out.dst.push_back(ld);
        out.len.push_back(ll);
      }
      ls = s;
      ld = d;
      ll = n;
      open = true;
    }
  }
  out.src.push_back(ls);
  out.dst.push_back(ld);
  out.len.push_back(ll);
  return out;
}

}  // namespace llumnix_kv
