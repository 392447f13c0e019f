// A one-line progress bar on standard error, drawn only when standard error
// is a terminal (a log file or pipe never sees control characters).
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace qcow2fs::img {

class ProgressBar {
 public:
  // `wanted`: the command asked for progress; it is drawn only if standard
  // error is also a terminal.
  ProgressBar(std::string label, bool wanted);
  ~ProgressBar() { Finish(); }
  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;

  bool active() const { return active_; }
  // Redraws at most ten times a second, and always at completion.
  void Update(uint64_t done, uint64_t total);
  // Ends the bar: `keep` leaves it on screen (at its last value) followed
  // by a new line; otherwise the line is erased. Idempotent.
  void Finish(bool keep = false);

 private:
  void Draw(uint64_t done, uint64_t total);

  std::string label_;
  bool active_;
  bool drawn_ = false;
  std::chrono::steady_clock::time_point last_draw_{};
};

}  // namespace qcow2fs::img
