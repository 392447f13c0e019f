// ReadAhead: while one large sequential read is being copied out to the
// kernel, the piece that follows is already being read from the image.
//
// Why: the daemon's host reads are O_DIRECT for large requests (see
// io/file.h), so the host kernel's readahead no longer runs ahead of a
// sequential reader; and FUSE serves a read in series (read the image, then
// copy the reply into the reader's pages), so with one request in flight
// (dd, cp, fio at queue depth 1) the disk idles during every copy. Fetching
// the next piece in the background overlaps the two.
//
// Which reads start a fetch: a large read (at least `min_read` bytes) that
// continues a stream, i.e. starts where a recent read ended or is served
// from a fetched piece. The fetch is a whole piece (`max_read` bytes) right
// after the read, or after the piece it was served from, so a stream of
// smaller reads (the kernel's 128 KiB readahead) is served from pieces too.
// Several streams are followed at once; each is fetched four pieces ahead.
//
// Coherence: the owner calls Invalidate() for every range it changes, both
// before and after changing it. A fetched piece overlapping the range is
// dropped, and a fetch in progress over it is marked stale and never
// served, so a read never sees data older than a write that completed
// before it began.
//
// Threading: all methods are thread-safe; fetches run on the object's own
// threads. Memory: `slots` buffers of `max_read` bytes, page-aligned (so the
// image can read them with O_DIRECT), allocated once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <thread>
#include <vector>

#include "mutex.h"
#include "qcow2fs/aligned_buffer.h"
#include "qcow2fs/status.h"
#include "thread_annotations.h"

namespace qcow2fs::fusefs {

class ReadAhead {
  struct Slot;

 public:
  // Reads [offset, offset + out.size()) of the image into `out`.
  using Fetch = std::function<Status(uint64_t offset, std::span<std::byte> out)>;

  ReadAhead(Fetch fetch, size_t min_read, size_t max_read, unsigned slots);
  // Waits for fetches in progress, then stops the threads.
  ~ReadAhead();
  ReadAhead(const ReadAhead&) = delete;
  ReadAhead& operator=(const ReadAhead&) = delete;

  // Keeps a fetched piece from being reused while a reply is sent out of
  // it; empty when the bytes are elsewhere.
  class Pin {
   public:
    Pin() = default;
    Pin(Pin&& other) noexcept;
    Pin& operator=(Pin&& other) noexcept;
    ~Pin();

   private:
    friend class ReadAhead;
    void Release();
    ReadAhead* owner_ = nullptr;
    Slot* slot_ = nullptr;
  };

  // Serves [offset, offset + scratch.size()), no further than `disk_size`.
  // Returns where the bytes are: inside a fetched piece (waiting for a fetch
  // in progress), held by `pin` until it is destroyed, so the reply needs
  // no copy; or in `scratch`, read from the image now. Then starts the
  // next fetches if this read continues a stream.
  Result<const std::byte*> Read(uint64_t offset, std::span<std::byte> scratch, uint64_t disk_size,
                                Pin& pin);
  // The image's content changes in [offset, offset + length).
  void Invalidate(uint64_t offset, uint64_t length);

 private:
  enum class State { kFree, kFetching, kReady };
  struct Slot {
    State state = State::kFree;
    uint64_t offset = 0;
    size_t length = 0;
    bool stale = false;   // the range changed since the fetch began: never served
    int users = 0;        // readers waiting on it or copying out of it
    bool served = false;  // a read was served from it (its stream moves on)
    uint64_t last_used = 0;
    Status status;
    AlignedBuffer buffer;  // page-aligned, so the image can read it with O_DIRECT
  };

  // With the lock: a ready or fetching slot covering the range, or null.
  Slot* FindLocked(uint64_t offset, size_t length) REQUIRES(mu_);
  // With the lock: queues a fetch of a piece at `offset` (up to disk_size)
  // unless a slot has it or none can be reused.
  void StartLocked(uint64_t offset, uint64_t disk_size) REQUIRES(mu_);
  // Whether a read at `offset` continues a recent read; records `end`.
  bool ContinuesStreamLocked(uint64_t offset, uint64_t end) REQUIRES(mu_);
  void Run() EXCLUDES(mu_);

  const Fetch fetch_;
  const size_t min_read_;
  const size_t max_read_;

  // A slot is guarded by mu_, except its buffer while kFetching (the one
  // fetching thread fills it) and while pinned (readers copy out of it).
  Mutex mu_;
  CondVar work_;     // a fetch was queued, or stopping
  CondVar fetched_;  // a fetch finished, or a slot was released
  std::vector<Slot> slots_ GUARDED_BY(mu_);
  std::vector<Slot*> queue_ GUARDED_BY(mu_);  // slots to fetch, oldest first
  // Where the last few large reads ended.
  std::vector<uint64_t> recent_ends_ GUARDED_BY(mu_);
  uint64_t clock_ GUARDED_BY(mu_) = 0;
  bool stopping_ GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace qcow2fs::fusefs
