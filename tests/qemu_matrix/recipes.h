// The read matrix's cases: a name and a recipe that builds the image with
// QEMU's tools (see harness.h for the builder).
#pragma once

#include <functional>
#include <ostream>
#include <string>
#include <vector>

#include "qemu_matrix/harness.h"

namespace qcow2fs::test::matrix {

// Builds one image with `bld`'s steps and fills in what to expect of it;
// a failed step is kept by the builder (Builder::result()).
using Recipe = std::function<void(Builder& bld, Built* b)>;

struct Case {
  std::string name;
  Recipe recipe;
};

inline void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

// Every case of the matrix: versions, cluster sizes, refcount widths,
// extended L2, compression, backing chains, data files, snapshots,
// preallocation, a huge disk and header variants.
std::vector<Case> AllCases();

}  // namespace qcow2fs::test::matrix
