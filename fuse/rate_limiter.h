// Decides which of a stream of repeated log messages to print, so that a
// failing host (a full disk, a dying one) produces a line per cause and a
// count rather than one line per failed request.
//
// Plain data and no I/O or libfuse, so it can be unit-tested with a clock
// the test controls; log.cc owns the instance the daemon uses.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace qcow2fs::fusefs {

// The cause a message stands for: its text with every number (decimal, or
// hexadecimal after "0x") replaced by '#', so "write at guest offset 1048576
// failed: No space left on device" and the same at offset 2097152 are one
// cause, while the same write failing with EIO is another.
std::string CauseOf(std::string_view message);

class RateLimiter {
 public:
  using Clock = std::chrono::steady_clock;

  // A line to print for messages that were held back.
  struct Summary {
    std::string cause;
    std::string last_message;  // the latest message held back
    uint64_t repeated = 0;     // how many were held back
    Clock::duration over{};    // since the last line printed for the cause
    std::string Text() const;  // "<last message> (repeated N times in S s)"
  };

  // At most one line per cause per `interval`; at most `max_causes` causes
  // are tracked at once (any further ones share one entry).
  explicit RateLimiter(Clock::duration interval = std::chrono::seconds(60),
                       size_t max_causes = 256);

  // One occurrence of `cause`. Returns whether to print `message` now: the
  // first of its cause, or the first after a whole quiet interval. Otherwise
  // it is counted for a later Summary.
  bool Admit(std::string_view cause, std::string_view message, Clock::time_point now);

  // Summaries that are due at `now`: for each cause with messages held back
  // whose interval has ended. Each starts a new interval for its cause.
  std::vector<Summary> Due(Clock::time_point now);

  // Every pending summary, due or not (at exit), and forgets all causes.
  std::vector<Summary> Drain(Clock::time_point now);

  size_t tracked_causes() const { return causes_.size(); }

 private:
  struct Entry {
    Clock::time_point window_start;  // when its last line was printed
    uint64_t held_back = 0;
    std::string last_message;
  };

  Clock::duration interval_;
  size_t max_causes_;
  std::map<std::string, Entry, std::less<>> causes_;
};

}  // namespace qcow2fs::fusefs
