// Internal snapshots taken, viewed, dropped and applied through the core,
// judged by QEMU: after each step `qemu-img check` finds the image clean,
// `qemu-img snapshot -l` lists what the core says, and `qemu-img convert -l`
// of each snapshot equals the model of the disk at the moment it was taken.
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>

#include "qcow2fs/image.h"
#include "test_support.h"

namespace qcow2fs::test {
namespace {

constexpr uint64_t kDisk = 4 << 20;

struct Kind {
  std::string name;
  std::string create_options;      // qemu-img create -o
  bool compressed_writes = false;  // seed some clusters with qemu-io write -c
  bool backing = false;
};

std::string KindName(const ::testing::TestParamInfo<Kind>& info) { return info.param.name; }

class SnapshotTest : public ::testing::TestWithParam<Kind> {
 protected:
  void SetUp() override {
    ASSERT_TRUE(RequireProgram("qemu-img"));
    ASSERT_TRUE(RequireProgram("qemu-io"));
    path_ = dir_.Join("disk.qcow2");
    model_.assign(kDisk, '\0');
    std::string backing_arg;
    if (GetParam().backing) {
      const std::string base = dir_.Join("base.qcow2");
      ASSERT_TRUE(QemuImg("create -q -f qcow2 " + ShellQuote(base) + " 4M"));
      ASSERT_TRUE(QemuIo(base, {"write -P 0x42 0 4M"}));
      model_.assign(kDisk, '\x42');
      backing_arg = " -b " + ShellQuote(base) + " -F qcow2";
    }
    ASSERT_TRUE(QemuImg("create -q -f qcow2 -o " + GetParam().create_options + backing_arg + " " +
                        ShellQuote(path_) + " 4M"));
    // Data written by QEMU first: plain, and compressed where asked.
    ASSERT_TRUE(QemuIo(path_, {"write -P 0x11 0 256k"}));
    Apply(0, std::string(256 << 10, '\x11'));
    if (GetParam().compressed_writes) {
      ASSERT_TRUE(QemuIo(path_, {"write -c -P 0x22 1M 128k"}));
      Apply(1 << 20, std::string(128 << 10, '\x22'));
    }
  }

  void Apply(uint64_t offset, const std::string& data) {
    model_.replace(offset, data.size(), data);
  }

  std::unique_ptr<Image> OpenWritable() {
    OpenOptions options;
    options.read_only = false;
    auto opened = Image::Open(path_, options);
    EXPECT_TRUE(opened.ok()) << Describe(opened.status());
    return opened.ok() ? std::move(opened).value() : nullptr;
  }

  // Writes `count` random pieces of random data, through the core and the
  // model.
  void WriteRandom(Image& image, std::mt19937_64& rng, int count) {
    for (int i = 0; i < count; i++) {
      const uint64_t length = 512 + rng() % (96 << 10);
      const uint64_t offset = rng() % (kDisk - length);
      const std::string data = RandomBytes(length, rng());
      Status s = image.Write(offset, AsBytes(data));
      ASSERT_TRUE(s.ok()) << Describe(s);
      Apply(offset, data);
    }
  }

  std::string ReadAll(Image& image) {
    std::string out(image.size(), '\0');
    Status s = image.Read(0, AsWritableBytes(out));
    EXPECT_TRUE(s.ok()) << Describe(s);
    return out;
  }

  // QEMU's view of the closed image: clean, and every snapshot and the
  // active disk equal to what the test expects.
  void ExpectQemuAgrees(const std::map<std::string, std::string>& snapshots) {
    std::string out;
    EXPECT_TRUE(QemuImg("check " + ShellQuote(path_), &out)) << out;
    std::string list;
    ASSERT_TRUE(QemuImg("snapshot -l " + ShellQuote(path_), &list));
    for (const auto& [name, content] : snapshots) {
      EXPECT_NE(list.find(" " + name + " "), std::string::npos) << name << " not in\n" << list;
      const std::string raw = dir_.Join("snap-" + name + ".raw");
      ASSERT_TRUE(QemuConvertToRaw(path_, raw, "-l snapshot.name=" + name));
      std::string got;
      ASSERT_TRUE(ReadWholeFile(raw, &got));
      EXPECT_TRUE(got == content) << "snapshot " << name << " differs from the disk when taken";
    }
    const std::string raw = dir_.Join("active.raw");
    ASSERT_TRUE(QemuConvertToRaw(path_, raw));
    std::string got;
    ASSERT_TRUE(ReadWholeFile(raw, &got));
    EXPECT_TRUE(got == model_) << "the active disk differs from the model";
  }

  TempDir dir_;
  std::string path_;
  std::string model_;
};

// Take three snapshots between rounds of writes (reading each through a
// view while the live disk is written), drop the middle one, and let QEMU
// judge after each close.
TEST_P(SnapshotTest, TakeViewDropAndQemuAgrees) {
  std::mt19937_64 rng(20261203);
  std::map<std::string, std::string> taken;
  {
    auto image = OpenWritable();
    ASSERT_NE(image, nullptr);
    for (const char* name : {"first", "second", "third"}) {
      WriteRandom(*image, rng, 12);
      Status s = image->CreateSnapshot(name);
      ASSERT_TRUE(s.ok()) << name << ": " << Describe(s);
      taken[name] = model_;
    }
    // A view reads the snapshot as taken while the live disk changes.
    auto view = image->OpenSnapshot("second");
    ASSERT_TRUE(view.ok()) << Describe(view.status());
    WriteRandom(*image, rng, 12);
    EXPECT_TRUE(ReadAll(**view) == taken["second"]);
    EXPECT_TRUE(ReadAll(*image) == model_);
    // Not while it is open; then it goes.
    EXPECT_EQ(image->DeleteSnapshot("second").code(), ErrorCode::kBusy);
    view->reset();
    Status dropped = image->DeleteSnapshot("second");
    ASSERT_TRUE(dropped.ok()) << Describe(dropped);
    taken.erase("second");
    WriteRandom(*image, rng, 12);
    EXPECT_TRUE(ReadAll(*image) == model_);
    Status flushed = image->Flush();
    ASSERT_TRUE(flushed.ok()) << Describe(flushed);
    const ImageInfo info = image->info();
    ASSERT_EQ(info.snapshots.size(), 2u);
    EXPECT_EQ(info.snapshots[0].name, "first");
    EXPECT_EQ(info.snapshots[1].name, "third");
    EXPECT_EQ(info.snapshots[1].id, "3");
  }
  ExpectQemuAgrees(taken);

  // Dropping the rest leaves an image QEMU finds clean, with the data.
  {
    auto image = OpenWritable();
    ASSERT_NE(image, nullptr);
    ASSERT_TRUE(image->DeleteSnapshot("first").ok());
    ASSERT_TRUE(image->DeleteSnapshot("3").ok());  // by ID
    WriteRandom(*image, rng, 6);
    ASSERT_TRUE(image->Flush().ok());
  }
  ExpectQemuAgrees({});
}

// Revert offline, as qemu-img snapshot -a does; the snapshot stays.
TEST_P(SnapshotTest, ApplyRevertsTheActiveDisk) {
  std::mt19937_64 rng(7);
  std::string at_snapshot;
  {
    auto image = OpenWritable();
    ASSERT_NE(image, nullptr);
    WriteRandom(*image, rng, 10);
    ASSERT_TRUE(image->CreateSnapshot("base").ok());
    at_snapshot = model_;
    WriteRandom(*image, rng, 10);
    ASSERT_TRUE(image->Flush().ok());
  }
  Status s = Image::ApplySnapshot(path_, "base");
  ASSERT_TRUE(s.ok()) << Describe(s);
  model_ = at_snapshot;
  ExpectQemuAgrees({{"base", at_snapshot}});
}

INSTANTIATE_TEST_SUITE_P(Kinds, SnapshotTest,
                         ::testing::Values(Kind{"Default", "cluster_size=64k"},
                                           Kind{"SmallClusters", "cluster_size=4k"},
                                           Kind{"Refcount4", "cluster_size=16k,refcount_bits=4"},
                                           Kind{"Refcount64", "cluster_size=16k,refcount_bits=64"},
                                           Kind{"ExtendedL2", "cluster_size=64k,extended_l2=on"},
                                           Kind{"Compressed", "cluster_size=64k", true},
                                           Kind{"Backing", "cluster_size=64k", false, true},
                                           Kind{"Version2", "compat=0.10,cluster_size=64k"}),
                         KindName);

class SnapshotRefusalTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_TRUE(RequireProgram("qemu-img")); }
  TempDir dir_;
};

// refcount_bits=2 counts at most 3 references: the active disk and two
// snapshots. The third is refused with nothing changed, the image not
// fenced, and QEMU agrees with what is there.
TEST_F(SnapshotRefusalTest, RefcountLimitRefusesCleanly) {
  const std::string img = dir_.Join("two.qcow2");
  ASSERT_TRUE(QemuImg("create -q -f qcow2 -o refcount_bits=2 " + ShellQuote(img) + " 1M"));
  ASSERT_TRUE(QemuIo(img, {"write -P 0x33 0 128k"}));
  OpenOptions options;
  options.read_only = false;
  {
    auto image = Image::Open(img, options);
    ASSERT_TRUE(image.ok()) << Describe(image.status());
    ASSERT_TRUE((*image)->CreateSnapshot("a").ok());
    ASSERT_TRUE((*image)->CreateSnapshot("b").ok());
    Status s = (*image)->CreateSnapshot("c");
    EXPECT_EQ(s.code(), ErrorCode::kNoSpace) << Describe(s);
    EXPECT_TRUE(ContainsNoCase(s.message(), "refcount_bits=2")) << Describe(s);
    EXPECT_FALSE((*image)->info().corrupt);
    const std::string data(4096, 'n');
    EXPECT_TRUE((*image)->Write(0, AsBytes(data)).ok());
    EXPECT_TRUE((*image)->Flush().ok());
  }
  EXPECT_TRUE(QemuImg("check " + ShellQuote(img)));
  std::string list;
  ASSERT_TRUE(QemuImg("snapshot -l " + ShellQuote(img), &list));
  EXPECT_EQ(list.find(" c "), std::string::npos) << list;
}

// Two compressed clusters packed into one host cluster give it refcount 2
// of refcount_bits=2's 3: there is room for one more reference, yet the
// snapshot's tree reaches that host cluster twice. The snapshot is
// refused partway, every reference taken back: the image is not fenced,
// not left dirty, QEMU finds it clean, and it goes on taking writes.
TEST_F(SnapshotRefusalTest, PackedCompressedClustersOverTheLimitAreRefusedWhole) {
  ASSERT_TRUE(RequireProgram("qemu-io"));
  const std::string img = dir_.Join("packed.qcow2");
  ASSERT_TRUE(QemuImg("create -q -f qcow2 -o refcount_bits=2 " + ShellQuote(img) + " 1M"));
  ASSERT_TRUE(QemuIo(
      img, {"write -c -P 0x44 0 64k", "write -c -P 0x45 64k 64k", "write -P 0x46 128k 64k"}));
  std::string before;
  ASSERT_TRUE(QemuConvertToRaw(img, dir_.Join("before.raw")));
  ASSERT_TRUE(ReadWholeFile(dir_.Join("before.raw"), &before));
  OpenOptions options;
  options.read_only = false;
  const std::string data(4096, 'n');
  {
    auto image = Image::Open(img, options);
    ASSERT_TRUE(image.ok()) << Describe(image.status());
    Status s = (*image)->CreateSnapshot("a");
    EXPECT_EQ(s.code(), ErrorCode::kNoSpace) << Describe(s);
    EXPECT_TRUE(ContainsNoCase(s.message(), "refcount_bits=2")) << Describe(s);
    EXPECT_FALSE((*image)->info().corrupt);
    EXPECT_FALSE((*image)->info().dirty);
    EXPECT_TRUE((*image)->Write(256 << 10, AsBytes(data)).ok());
    EXPECT_TRUE((*image)->Flush().ok());
  }
  EXPECT_TRUE(QemuImg("check " + ShellQuote(img)));
  std::string list;
  ASSERT_TRUE(QemuImg("snapshot -l " + ShellQuote(img), &list));
  EXPECT_EQ(list.find(" a "), std::string::npos) << list;
  std::string after;
  ASSERT_TRUE(QemuConvertToRaw(img, dir_.Join("after.raw")));
  ASSERT_TRUE(ReadWholeFile(dir_.Join("after.raw"), &after));
  before.replace(256 << 10, data.size(), data);
  EXPECT_TRUE(after == before);
}

TEST_F(SnapshotRefusalTest, RefusesWhatQemuRefuses) {
  const std::string one = dir_.Join("one.qcow2");
  ASSERT_TRUE(QemuImg("create -q -f qcow2 -o refcount_bits=1 " + ShellQuote(one) + " 1M"));
  OpenOptions options;
  options.read_only = false;
  {
    auto image = Image::Open(one, options);
    ASSERT_TRUE(image.ok()) << Describe(image.status());
    Status s = (*image)->CreateSnapshot("s");
    EXPECT_EQ(s.code(), ErrorCode::kUnsupported) << Describe(s);
    EXPECT_TRUE(ContainsNoCase(s.message(), "refcount_bits=1")) << Describe(s);
  }
  const std::string img = dir_.Join("img.qcow2");
  ASSERT_TRUE(QemuImg("create -q -f qcow2 " + ShellQuote(img) + " 1M"));
  ASSERT_TRUE(QemuImg("snapshot -c made-by-qemu " + ShellQuote(img)));
  {
    auto image = Image::Open(img, options);
    ASSERT_TRUE(image.ok()) << Describe(image.status());
    EXPECT_EQ((*image)->CreateSnapshot("made-by-qemu").code(), ErrorCode::kAlreadyExists);
    EXPECT_EQ((*image)->CreateSnapshot("").code(), ErrorCode::kInvalidArgument);
    EXPECT_EQ((*image)->DeleteSnapshot("nothing").code(), ErrorCode::kNotFound);
    EXPECT_TRUE((*image)->DeleteSnapshot("made-by-qemu").ok());
  }
  {
    auto image = Image::Open(img, OpenOptions{});
    ASSERT_TRUE(image.ok());
    EXPECT_EQ((*image)->CreateSnapshot("s").code(), ErrorCode::kReadOnly);
  }
  EXPECT_TRUE(QemuImg("check " + ShellQuote(img)));
}

// Snapshots taken while a writer runs. The writer writes numbered 64 KiB
// blocks one at a time into 16 slots; a snapshot must hold, in every slot,
// a block at least as new as the last one completed before CreateSnapshot
// was called, and none that started after it returned. Judged through a
// view, then by qemu-img after close.
TEST_F(SnapshotRefusalTest, TakenDuringWritesHoldsExactlyTheCompletedOnes) {
  ASSERT_TRUE(RequireProgram("qemu-io"));
  constexpr uint64_t kBlock = 64 << 10, kSlots = 16;
  const std::string img = dir_.Join("busy.qcow2");
  ASSERT_TRUE(QemuImg("create -q -f qcow2 " + ShellQuote(img) + " 1M"));
  auto image = OpenWritable(img);
  ASSERT_NE(image, nullptr);
  std::atomic<uint32_t> started{0}, completed{0};
  std::atomic<bool> stop{false}, failed{false};
  std::thread writer([&] {
    for (uint32_t i = 1; !stop.load(); i++) {
      std::string block(kBlock, static_cast<char>(i));
      std::memcpy(block.data(), &i, sizeof i);
      started.store(i);
      if (!image->Write((i % kSlots) * kBlock, AsBytes(block)).ok()) failed.store(true);
      completed.store(i);
    }
  });
  struct Taken {
    std::string name;
    uint32_t before, after;
  };
  std::vector<Taken> taken;
  for (int n = 0; n < 4; n++) {
    while (completed.load() < static_cast<uint32_t>(40 * (n + 1))) std::this_thread::yield();
    Taken t{"busy" + std::to_string(n), completed.load(), 0};
    Status s = image->CreateSnapshot(t.name);
    t.after = started.load();
    ASSERT_TRUE(s.ok()) << Describe(s);
    taken.push_back(t);
  }
  stop.store(true);
  writer.join();
  ASSERT_FALSE(failed.load());
  // Slot k holds writes k, k+16, k+32, ...: what a snapshot may show there.
  auto judge = [&](const Taken& t, const std::string& disk) {
    for (uint64_t k = 0; k < kSlots; k++) {
      uint32_t v;
      std::memcpy(&v, disk.data() + k * kBlock, sizeof v);
      uint32_t last_before = 0;
      for (uint32_t i = static_cast<uint32_t>(k); i <= t.before; i += kSlots) last_before = i;
      EXPECT_TRUE(v % kSlots == k || v == 0) << t.name << " slot " << k << ": block " << v;
      EXPECT_GE(v, last_before) << t.name << " slot " << k << " lost a completed write";
      EXPECT_LE(v, t.after) << t.name << " slot " << k << " holds a write started after it";
    }
  };
  std::map<std::string, std::string> contents;
  for (const Taken& t : taken) {
    auto view = image->OpenSnapshot(t.name);
    ASSERT_TRUE(view.ok()) << Describe(view.status());
    std::string disk((*view)->size(), '\0');
    ASSERT_TRUE((*view)->Read(0, AsWritableBytes(disk)).ok());
    judge(t, disk);
    contents[t.name] = disk;
  }
  ASSERT_TRUE(image->Flush().ok());
  image.reset();
  EXPECT_TRUE(QemuImg("check " + ShellQuote(img)));
  for (const auto& [name, disk] : contents) {
    const std::string raw = dir_.Join(name + ".raw");
    ASSERT_TRUE(QemuConvertToRaw(img, raw, "-l snapshot.name=" + name));
    std::string got;
    ASSERT_TRUE(ReadWholeFile(raw, &got));
    EXPECT_TRUE(got == disk) << "qemu-img reads snapshot " << name << " differently";
  }
}

}  // namespace
}  // namespace qcow2fs::test
