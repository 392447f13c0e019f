// ClusterPieces: a byte range cut at cluster boundaries, the walk every
// request over guest (or host) bytes makes, written once.
#pragma once

#include <algorithm>
#include <cstdint>

namespace qcow2fs {

// The part of a byte range that lies in one cluster.
struct ClusterPiece {
  uint64_t index;          // the cluster's index (its offset >> cluster_bits)
  uint64_t cluster_start;  // the cluster's first byte
  uint64_t begin;          // the piece is [begin, end), inside the cluster
  uint64_t end;
  uint64_t length() const { return end - begin; }
  // Where the piece starts and ends, relative to its cluster.
  uint64_t begin_in_cluster() const { return begin - cluster_start; }
  uint64_t end_in_cluster() const { return end - cluster_start; }
};

// for (const ClusterPiece& p : ClusterPieces(begin, end, cluster_bits)) ...
// visits the clusters of [begin, end) in order, the first and last piece
// possibly partial; an empty range has no pieces.
class ClusterPieces {
 public:
  ClusterPieces(uint64_t begin, uint64_t end, uint32_t cluster_bits)
      : begin_(begin), end_(std::max(begin, end)), bits_(cluster_bits) {}

  class Iterator {
   public:
    ClusterPiece operator*() const {
      const uint64_t index = pos_ >> bits_;
      const uint64_t start = index << bits_;
      return {index, start, pos_, std::min(end_, start + (uint64_t{1} << bits_))};
    }
    Iterator& operator++() {
      pos_ = std::min(end_, ((pos_ >> bits_) + 1) << bits_);
      return *this;
    }
    bool operator==(const Iterator& other) const { return pos_ == other.pos_; }

   private:
    friend class ClusterPieces;
    Iterator(uint64_t pos, uint64_t end, uint32_t bits) : pos_(pos), end_(end), bits_(bits) {}
    uint64_t pos_, end_;
    uint32_t bits_;
  };

  Iterator begin() const { return {begin_, end_, bits_}; }
  Iterator end() const { return {end_, end_, bits_}; }

 private:
  uint64_t begin_, end_;
  uint32_t bits_;
};

}  // namespace qcow2fs
