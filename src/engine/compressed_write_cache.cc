// CompressedWriteCache implementation.
#include "engine/compressed_write_cache.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <new>

#include "base/sync_point.h"
#include "codec/compression.h"
#include "format/align.h"
#include "format/cluster_pieces.h"
#include "format/l2_entry.h"

namespace qcow2fs {
namespace {

bool AllZeroBytes(std::span<const std::byte> data) {
  const std::byte* p = data.data();
  size_t n = data.size();
  for (; n >= 8; p += 8, n -= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    if (w != 0) return false;
  }
  for (; n > 0; p++, n--) {
    if (*p != std::byte{0}) return false;
  }
  return true;
}

}  // namespace

CompressedWriteCache::CompressedWriteCache(CompressedClusterSink& sink, CompressionType type,
                                           uint64_t cluster_size, uint64_t max_per_host_cluster,
                                           uint64_t disk_size, size_t max_bytes, Executor executor)
    : sink_(sink),
      type_(type),
      cluster_size_(cluster_size),
      cluster_bits_(static_cast<uint32_t>(std::countr_zero(cluster_size))),
      max_entries_(std::max<size_t>(16, (max_bytes ? max_bytes : (64u << 20)) / cluster_size)),
      max_users_(max_per_host_cluster),
      // Segments of 8 MiB (at least two clusters) keep host writes large,
      // and the space lost at the end of each (the rest of its last host
      // cluster) one in a thousand.
      segment_clusters_(std::max<uint64_t>(2, (8u << 20) / cluster_size)),
      disk_size_(disk_size),
      executor_(std::move(executor)) {}

CompressedWriteCache::~CompressedWriteCache() {
  // Background jobs reference this object: let them finish.
  MutexLock lk(mu_);
  while (background_jobs_ != 0) changed_.Wait(mu_);
}

Status CompressedWriteCache::Complete(Entry& e) {
  if (!executor_) return Finish(e);
  Job job = Start(e);
  background_jobs_++;
  try {
    executor_([this, job = std::move(job)]() mutable { RunJob(std::move(job)); });
  } catch (...) {
    // No room for a task: do the work here instead.
    background_jobs_--;
    Requeue(e);
    return Finish(e);
  }
  return Status();
}

void CompressedWriteCache::RunJob(Job job) {
  MutexLock lk(mu_);
  // A failure leaves the cluster staged (Requeue); the next Flush() retries
  // it on its own thread and reports the error to its caller.
  (void)CompressAndPlace(job);
  background_jobs_--;
  changed_.NotifyAll();
}

void CompressedWriteCache::set_disk_size(uint64_t size) {
  MutexLock lk(mu_);
  disk_size_ = size;
}

size_t CompressedWriteCache::staged_bytes() const {
  MutexLock lk(mu_);
  return entries_.size() * cluster_size_;
}

void CompressedWriteCache::MarkValid(Entry& e, uint64_t from, uint64_t to) {
  for (uint64_t i = from; i < to;) {
    const uint64_t word = i / 64, bit = i % 64;
    const uint64_t n = std::min<uint64_t>(64 - bit, to - i);
    const uint64_t mask = (n == 64 ? ~uint64_t{0} : ((uint64_t{1} << n) - 1)) << bit;
    e.valid_bytes += static_cast<uint64_t>(std::popcount(mask & ~e.valid[word]));
    e.valid[word] |= mask;
    i += n;
  }
}

void CompressedWriteCache::Erase(uint64_t index) {
  auto it = entries_.find(index);
  if (it == entries_.end()) return;
  if (it->second->state == State::kFilling) lru_.erase(it->second->lru);
  entries_.erase(it);
  changed_.NotifyAll();
}

Status CompressedWriteCache::WaitForCommit(const Entry& e) {
  QCOW2FS_SYNC_POINT("CompressCache:WaitingForCommit", e.guest_offset);
  // A packed entry would wait for the segment to fill up: write it out now.
  if (e.state == State::kPacked && !sealing_ && !segment_.placed.empty()) {
    return SealSegment();
  }
  changed_.Wait(mu_);
  return Status();
}

Status CompressedWriteCache::Write(uint64_t offset, std::span<const std::byte> data) {
  MutexLock lk(mu_);
  for (const ClusterPiece& p : ClusterPieces(offset, offset + data.size(), cluster_bits_)) {
    QCOW2FS_ASSIGN_OR_RETURN(Entry* const e, FillingEntry(p.index));
    std::memcpy(e->data.data() + p.begin_in_cluster(), data.data() + (p.begin - offset),
                p.length());
    MarkValid(*e, p.begin_in_cluster(), p.end_in_cluster());
    if (IsComplete(*e)) QCOW2FS_RETURN_IF_ERROR(Complete(*e));
  }
  return Status();
}

Result<CompressedWriteCache::Entry*> CompressedWriteCache::FillingEntry(uint64_t index) {
  while (true) {
    auto it = entries_.find(index);
    if (it != entries_.end()) {
      if (it->second->state == State::kFilling) return it->second.get();
      // Being compressed or waiting in the segment: let it reach the image
      // first, then stage the new data on top.
      QCOW2FS_RETURN_IF_ERROR(WaitForCommit(*it->second));
    } else if (direct_writers_.count(index)) {
      // A direct write to this cluster is under way: stage after it.
      changed_.Wait(mu_);
    } else if (entries_.size() >= max_entries_) {
      QCOW2FS_RETURN_IF_ERROR(MakeRoom());
    } else {
      break;
    }
  }
  auto entry = std::make_unique<Entry>();
  const uint64_t cluster_start = index << cluster_bits_;
  entry->guest_offset = cluster_start;
  entry->data.resize(cluster_size_);
  entry->valid.resize((cluster_size_ + 63) / 64);
  // Bytes past the end of the disk are known: they are zeros.
  if (disk_size_ < cluster_start + cluster_size_) {
    MarkValid(*entry, disk_size_ > cluster_start ? disk_size_ - cluster_start : 0, cluster_size_);
  }
  lru_.push_back(index);
  entry->lru = std::prev(lru_.end());
  return entries_.emplace(index, std::move(entry)).first->second.get();
}

CompressedWriteCache::Job CompressedWriteCache::Start(Entry& e) {
  e.state = State::kCompressing;
  lru_.erase(e.lru);
  Job job{&e, {}};
  if (!IsComplete(e)) job.filled = e.data;
  return job;
}

void CompressedWriteCache::Requeue(Entry& e) {
  e.state = State::kFilling;
  lru_.push_front(e.guest_offset >> cluster_bits_);
  e.lru = lru_.begin();
  changed_.NotifyAll();
}

void CompressedWriteCache::Settle(uint64_t index, const Status& stored) {
  auto it = entries_.find(index);
  if (it == entries_.end()) return;
  if (!stored.ok()) {
    Requeue(*it->second);  // keep the data staged; a later flush retries
    return;
  }
  Erase(index);
}

Status CompressedWriteCache::Finish(Entry& e) {
  Job job = Start(e);
  return CompressAndPlace(job);
}

Status CompressedWriteCache::CompressAndPlace(Job& job) {
  auto prepared = [&]() REQUIRES(mu_) {
    MutexUnlock unlocked(mu_);
    return Prepare(job);
  }();
  if (!prepared.ok()) {
    Requeue(*job.entry);
    return prepared.status();
  }
  return Place(job, std::move(prepared).value());
}

Result<CompressedWriteCache::Prepared> CompressedWriteCache::Prepare(Job& job) {
  const Entry& e = *job.entry;
  if (!job.filled.empty()) {
    // Unknown bytes keep what the image holds now.
    std::vector<std::byte> old(cluster_size_);
    QCOW2FS_RETURN_IF_ERROR(sink_.ReadClusterForFill(e.guest_offset, old));
    for (uint64_t i = 0; i < cluster_size_; i++) {
      if (!IsValid(e, i)) job.filled[i] = old[i];
    }
  }
  const std::vector<std::byte>& data = job.filled.empty() ? e.data : job.filled;
  Prepared p;
  if (sink_.CanZeroClusters() && AllZeroBytes(data)) {
    p.action = Prepared::Action::kZero;
    return p;
  }
  p.compressed.resize(cluster_size_);
  QCOW2FS_ASSIGN_OR_RETURN(size_t n, CompressCluster(type_, data, p.compressed));
  if (n == 0) {
    p.action = Prepared::Action::kUncompressed;
    p.compressed.clear();
  } else {
    p.action = Prepared::Action::kCompressed;
    p.compressed.resize(n);
  }
  return p;
}

Status CompressedWriteCache::Place(Job& job, Prepared prepared) {
  Entry& e = *job.entry;
  if (!job.filled.empty()) {
    e.data = std::move(job.filled);
    std::fill(e.valid.begin(), e.valid.end(), ~uint64_t{0});
    e.valid_bytes = cluster_size_;
  }
  if (prepared.action != Prepared::Action::kCompressed) {
    Status s;
    {
      MutexUnlock unlocked(mu_);
      QCOW2FS_SYNC_POINT("CompressCache:BeforePlainCommit", e.guest_offset);
      s = prepared.action == Prepared::Action::kZero
              ? sink_.ZeroCluster(e.guest_offset)
              : sink_.WriteUncompressedCluster(e.guest_offset, e.data);
    }
    Settle(e.guest_offset >> cluster_bits_, s);
    return s;
  }
  const uint64_t n = prepared.compressed.size();
  uint64_t at;
  while (!TryPack(n, &at)) {
    Status s;
    if (sealing_) {
      changed_.Wait(mu_);
      continue;
    }
    if (!segment_.placed.empty()) {
      s = SealSegment();  // full: write it out
    } else {
      // Host clusters are allocated when the segment is sealed, exactly as
      // many as it fills: no cluster is allocated and then left free.
      try {
        segment_.data = spare_segment_.empty() ? AlignedBuffer(segment_clusters_ << cluster_bits_)
                                               : std::move(spare_segment_);
        std::memset(segment_.data.data(), 0, segment_.data.size());
      } catch (const std::bad_alloc&) {
        s = Status(ErrorCode::kIoError, "no memory for a compressed segment", ENOMEM);
      }
      segment_.users.assign(segment_clusters_, 0);
      segment_.used = 0;
    }
    if (!s.ok()) {
      Requeue(e);
      return s;
    }
  }
  std::memcpy(segment_.data.data() + at, prepared.compressed.data(), n);
  segment_.placed.push_back({e.guest_offset, at, n});
  e.state = State::kPacked;
  changed_.NotifyAll();
  // A full segment goes out now: one large aligned write.
  if (segment_.data.size() - segment_.used < kSectorSize) return SealSegment();
  return Status();
}

bool CompressedWriteCache::TryPack(uint64_t n, uint64_t* at) {
  if (sealing_ || segment_.data.empty()) return false;
  uint64_t start = segment_.used;
  // Each compressed cluster adds one to the refcount of every host cluster
  // it touches; a host cluster at the refcount width's limit is skipped.
  while (start + n <= segment_.data.size()) {
    const uint64_t first = start >> cluster_bits_, last = (start + n - 1) >> cluster_bits_;
    bool room = true;
    for (uint64_t c = first; c <= last; c++) room = room && segment_.users[c] < max_users_;
    if (room) {
      for (uint64_t c = first; c <= last; c++) segment_.users[c]++;
      *at = start;
      segment_.used = start + n;
      return true;
    }
    start = (first + 1) << cluster_bits_;
  }
  return false;
}

Status CompressedWriteCache::SealSegment() {
  sealing_ = true;
  Segment s = std::move(segment_);
  segment_ = Segment{};
  Status st;
  if (!s.placed.empty()) {
    // The used part, padded to 4 KiB where its last host cluster allows so
    // that it can go O_DIRECT. The sink allocates the clusters it spans, and
    // every one of them holds compressed data: packing only skips the rest
    // of a cluster that is at its refcount limit.
    const uint64_t bytes =
        std::min(AlignUp(s.used, cluster_size_), AlignUp(s.used, AlignedBuffer::kAlignment));
    MutexUnlock unlocked(mu_);
    st = sink_.StoreSegment({s.data.data(), bytes}, s.placed);
  }
  if (spare_segment_.empty()) spare_segment_ = std::move(s.data);
  for (const auto& p : s.placed) Settle(p.guest_offset >> cluster_bits_, st);
  sealing_ = false;
  changed_.NotifyAll();
  return st;
}

Status CompressedWriteCache::MakeRoom() {
  // Complete clusters being compressed in the background will free room:
  // wait for them rather than force out a cluster that is still filling
  // (which would be compressed twice and fragment the image).
  if (background_jobs_ > 0) {
    changed_.Wait(mu_);
    return Status();
  }
  if (!lru_.empty()) {
    Entry& e = *entries_.at(lru_.front());
    return Finish(e);
  }
  if (!sealing_ && !segment_.placed.empty()) return SealSegment();
  changed_.Wait(mu_);
  return Status();
}

CompressedWriteCache::Snapshot CompressedWriteCache::Capture(uint64_t offset,
                                                             uint64_t length) const {
  Snapshot snap;
  MutexLock lk(mu_);
  if (entries_.empty()) return snap;
  for (const ClusterPiece& p : ClusterPieces(offset, offset + length, cluster_bits_)) {
    auto it = entries_.find(p.index);
    if (it == entries_.end()) continue;
    const Entry& e = *it->second;
    // Runs of valid bytes become pieces.
    for (uint64_t i = p.begin_in_cluster(); i < p.end_in_cluster();) {
      if (!IsValid(e, i)) {
        i++;
        continue;
      }
      uint64_t j = i;
      while (j < p.end_in_cluster() && IsValid(e, j)) j++;
      snap.pieces.push_back({p.cluster_start + i,
                             std::vector<std::byte>(e.data.begin() + static_cast<ptrdiff_t>(i),
                                                    e.data.begin() + static_cast<ptrdiff_t>(j))});
      i = j;
    }
  }
  return snap;
}

void CompressedWriteCache::Apply(const Snapshot& snapshot, uint64_t offset,
                                 std::span<std::byte> buf) {
  for (const auto& p : snapshot.pieces) {
    std::memcpy(buf.data() + (p.offset - offset), p.bytes.data(), p.bytes.size());
  }
}

std::optional<uint64_t> CompressedWriteCache::FirstStaged(uint64_t offset, uint64_t end) const {
  MutexLock lk(mu_);
  std::optional<uint64_t> first;
  for (const auto& [index, e] : entries_) {
    const uint64_t start = index << cluster_bits_;
    if (Overlaps(index, offset, end) && (!first || start < *first)) {
      first = std::max(start, offset);
    }
  }
  return first;
}

bool CompressedWriteCache::BeginDirectWrite(uint64_t cluster_index) {
  MutexLock lk(mu_);
  if (entries_.count(cluster_index)) return false;
  direct_writers_[cluster_index]++;
  return true;
}

void CompressedWriteCache::EndDirectWrite(uint64_t cluster_index) {
  MutexLock lk(mu_);
  auto it = direct_writers_.find(cluster_index);
  if (it == direct_writers_.end()) return;  // not admitted: nothing to end
  if (--it->second == 0) {
    direct_writers_.erase(it);
    changed_.NotifyAll();
  }
}

Status CompressedWriteCache::SettleRange(uint64_t offset, uint64_t length) {
  const uint64_t end = offset + length;
  MutexLock lk(mu_);
  while (true) {
    const Entry* busy = nullptr;
    for (const auto& [index, e] : entries_) {
      if (Overlaps(index, offset, end) && e->state != State::kFilling) {
        busy = e.get();
        break;
      }
    }
    if (!busy) return Status();
    // Let it reach the image; the caller's change then applies to it.
    QCOW2FS_RETURN_IF_ERROR(WaitForCommit(*busy));
  }
}

bool CompressedWriteCache::DropStaged(uint64_t offset, uint64_t length) {
  const uint64_t end = offset + length;
  MutexLock lk(mu_);
  std::vector<uint64_t> doomed;
  for (const auto& [index, e] : entries_) {
    if (!Overlaps(index, offset, end)) continue;
    if (e->state != State::kFilling) return false;
    doomed.push_back(index);
  }
  for (uint64_t index : doomed) Erase(index);
  return true;
}

Status CompressedWriteCache::Flush() {
  MutexLock lk(mu_);

  std::vector<uint64_t> pending;
  std::vector<Job> jobs;
  for (const auto& [index, e] : entries_) {
    pending.push_back(index);
    if (e->state == State::kFilling) jobs.push_back(Start(*e));
  }
  // Compression happens here, on the flushing thread. In the daemon the
  // bulk of it has already run in parallel: each FUSE worker on the TBB
  // pool compresses the clusters its writes complete, so a flush only finds
  // the few clusters that were still incomplete.
  Status first_error;
  for (Job& job : jobs) {
    const Status s = CompressAndPlace(job);
    if (!s.ok() && first_error.ok()) first_error = s;
  }
  QCOW2FS_RETURN_IF_ERROR(first_error);
  // Everything staged when we started must reach the image: entries other
  // threads are compressing, entries written to again since (their earlier
  // bytes are ours to flush), and the segment.
  while (true) {
    Entry* filling = nullptr;
    bool busy = false, compressing = false;
    for (uint64_t index : pending) {
      auto it = entries_.find(index);
      if (it == entries_.end()) continue;
      if (it->second->state == State::kFilling) {
        filling = it->second.get();
        break;
      }
      busy = true;
      if (it->second->state == State::kCompressing) compressing = true;
    }
    if (filling) {
      QCOW2FS_RETURN_IF_ERROR(Finish(*filling));
      continue;
    }
    if (!busy) break;
    // Clusters still being compressed (at unmount after a fast cp, hundreds
    // queued on the executor) will be packed into the segment: wait for
    // them rather than seal it around each one as it arrives, which wasted
    // the rest of a host cluster (and released clusters) per cluster.
    if (!compressing && !sealing_ && !segment_.placed.empty()) {
      QCOW2FS_RETURN_IF_ERROR(SealSegment());
    } else {
      QCOW2FS_SYNC_POINT("CompressCache:FlushWaiting", compressing);
      changed_.Wait(mu_);
    }
  }
  if (!sealing_ && !segment_.placed.empty()) QCOW2FS_RETURN_IF_ERROR(SealSegment());
  return Status();
}

}  // namespace qcow2fs
