// A one-line progress bar on standard error.
#include "progress.h"

#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>

#include "common.h"

namespace qcow2fs::img {
namespace {

constexpr char kHashes[] = "##################################################";
constexpr char kDots[] = "..................................................";

}  // namespace

ProgressBar::ProgressBar(std::string label, bool wanted)
    : label_(std::move(label)), active_(wanted && ::isatty(STDERR_FILENO) == 1) {}

void ProgressBar::Update(uint64_t done, uint64_t total) {
  if (!active_) return;
  const auto now = std::chrono::steady_clock::now();
  if (drawn_ && done < total && now - last_draw_ < std::chrono::milliseconds(100)) return;
  last_draw_ = now;
  Draw(done, total);
}

void ProgressBar::Draw(uint64_t done, uint64_t total) {
  int columns = 80;
  struct winsize ws {};
  if (::ioctl(STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) columns = ws.ws_col;
  const double fraction =
      total == 0 ? 1.0 : std::min(1.0, static_cast<double>(done) / static_cast<double>(total));
  char tail[96];
  std::snprintf(tail, sizeof tail, " %5.1f%%  %s / %s", fraction * 100.0, HumanSize(done).c_str(),
                HumanSize(total).c_str());
  const std::string tail_str = tail;
  // label [#####.....] tail, fitted to the terminal's width.
  const int fixed = static_cast<int>(label_.size() + tail_str.size()) + 4;
  const int width = std::clamp(columns - fixed - 1, 0, 50);
  std::fprintf(stderr, "\r%s ", label_.c_str());
  if (width >= 10) {
    const int filled = static_cast<int>(fraction * width);
    std::fprintf(stderr, "[%.*s%.*s]", filled, kHashes, width - filled, kDots);
  }
  // \033[K clears what a longer previous line left.
  std::fprintf(stderr, "%s\033[K", tail_str.c_str());
  std::fflush(stderr);
  drawn_ = true;
}

void ProgressBar::Finish(bool keep) {
  if (!active_) return;
  active_ = false;
  if (!drawn_) return;
  std::fputs(keep ? "\n" : "\r\033[K", stderr);
  std::fflush(stderr);
}

}  // namespace qcow2fs::img
