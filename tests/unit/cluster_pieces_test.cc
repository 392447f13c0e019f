// Unit tests of format/cluster_pieces.h: a byte range cut at cluster
// boundaries, the walk every request makes.
#include "format/cluster_pieces.h"

#include <gtest/gtest.h>

#include <vector>

namespace qcow2fs {
namespace {

// The pieces of [begin, end) as {index, begin, end} triples, checking the
// fields that follow from those on the way.
std::vector<std::vector<uint64_t>> Pieces(uint64_t begin, uint64_t end, uint32_t bits) {
  std::vector<std::vector<uint64_t>> out;
  for (const ClusterPiece& p : ClusterPieces(begin, end, bits)) {
    EXPECT_EQ(p.cluster_start, p.index << bits);
    EXPECT_EQ(p.length(), p.end - p.begin);
    EXPECT_EQ(p.begin_in_cluster(), p.begin - p.cluster_start);
    EXPECT_EQ(p.end_in_cluster(), p.end - p.cluster_start);
    EXPECT_GT(p.length(), 0u);
    EXPECT_LE(p.end_in_cluster(), uint64_t{1} << bits);
    out.push_back({p.index, p.begin, p.end});
  }
  return out;
}

using Cut = std::vector<std::vector<uint64_t>>;

TEST(ClusterPieces, AnEmptyOrReversedRangeHasNoPieces) {
  EXPECT_EQ(Pieces(0, 0, 16), Cut{});
  EXPECT_EQ(Pieces(70000, 70000, 16), Cut{});
  EXPECT_EQ(Pieces(70000, 100, 16), Cut{});
}

TEST(ClusterPieces, ARangeInsideOneClusterIsOnePiece) {
  EXPECT_EQ(Pieces(100, 200, 16), (Cut{{0, 100, 200}}));
  EXPECT_EQ(Pieces(65536 + 1, 2 * 65536, 16), (Cut{{1, 65537, 131072}}));
}

TEST(ClusterPieces, AlignedClustersAreWholePieces) {
  EXPECT_EQ(Pieces(65536, 3 * 65536, 16), (Cut{{1, 65536, 131072}, {2, 131072, 196608}}));
}

TEST(ClusterPieces, PartialFirstAndLastPiecesAroundWholeOnes) {
  EXPECT_EQ(Pieces(1000, 3 * 4096 + 7, 12),
            (Cut{{0, 1000, 4096}, {1, 4096, 8192}, {2, 8192, 12288}, {3, 12288, 12295}}));
}

TEST(ClusterPieces, SmallestAndLargestClusters) {
  // 512-byte clusters: one byte either side of a boundary.
  EXPECT_EQ(Pieces(511, 513, 9), (Cut{{0, 511, 512}, {1, 512, 513}}));
  // 2 MiB clusters, far into a 16 TiB disk.
  const uint64_t base = uint64_t{16} << 40;
  EXPECT_EQ(Pieces(base - 1, base + (2 << 20) + 1, 21),
            (Cut{{(base >> 21) - 1, base - 1, base},
                 {base >> 21, base, base + (2 << 20)},
                 {(base >> 21) + 1, base + (2 << 20), base + (2 << 20) + 1}}));
}

}  // namespace
}  // namespace qcow2fs
