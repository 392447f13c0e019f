// See rate_limiter.h.
#include "rate_limiter.h"

#include <cctype>
#include <utility>

namespace qcow2fs::fusefs {
namespace {

// Causes beyond the limit are counted together under this key.
constexpr std::string_view kOverflowCause = "\x01other";

bool IsDigit(char c) { return c >= '0' && c <= '9'; }
bool IsHexDigit(char c) { return std::isxdigit(static_cast<unsigned char>(c)) != 0; }

}  // namespace

std::string CauseOf(std::string_view message) {
  std::string cause;
  cause.reserve(message.size());
  size_t i = 0;
  while (i < message.size()) {
    if (message[i] == '0' && i + 2 < message.size() &&
        (message[i + 1] == 'x' || message[i + 1] == 'X') && IsHexDigit(message[i + 2])) {
      i += 2;
      while (i < message.size() && IsHexDigit(message[i])) ++i;
      cause += '#';
    } else if (IsDigit(message[i])) {
      while (i < message.size() && IsDigit(message[i])) ++i;
      cause += '#';
    } else {
      cause += message[i++];
    }
  }
  return cause;
}

std::string RateLimiter::Summary::Text() const {
  auto seconds = std::chrono::ceil<std::chrono::seconds>(over).count();
  if (seconds < 1) seconds = 1;
  return last_message + " (repeated " + std::to_string(repeated) +
         (repeated == 1 ? " time" : " times") + " in " + std::to_string(seconds) + " s)";
}

RateLimiter::RateLimiter(Clock::duration interval, size_t max_causes)
    : interval_(interval), max_causes_(max_causes < 1 ? 1 : max_causes) {}

bool RateLimiter::Admit(std::string_view cause, std::string_view message, Clock::time_point now) {
  auto it = causes_.find(cause);
  if (it == causes_.end()) {
    // Make room: causes quiet for a whole interval are forgotten (Due()
    // has printed whatever they held back).
    if (causes_.size() >= max_causes_) {
      for (auto e = causes_.begin(); e != causes_.end();) {
        bool idle = e->second.held_back == 0 && now - e->second.window_start >= interval_;
        e = idle ? causes_.erase(e) : std::next(e);
      }
    }
    if (causes_.size() >= max_causes_) {
      cause = kOverflowCause;
      it = causes_.find(cause);
    }
    if (it == causes_.end()) {
      causes_.emplace(std::string(cause), Entry{now, 0, {}});
      return true;
    }
  }
  Entry& entry = it->second;
  if (now - entry.window_start >= interval_ && entry.held_back == 0) {
    entry.window_start = now;  // quiet for a whole interval: a fresh start
    return true;
  }
  // Within the interval, or its summary is due now (Due() will include
  // this one).
  ++entry.held_back;
  entry.last_message.assign(message);
  return false;
}

std::vector<RateLimiter::Summary> RateLimiter::Due(Clock::time_point now) {
  std::vector<Summary> due;
  for (auto it = causes_.begin(); it != causes_.end();) {
    Entry& entry = it->second;
    if (now - entry.window_start < interval_) {
      ++it;
    } else if (entry.held_back > 0) {
      due.push_back(
          {it->first, std::move(entry.last_message), entry.held_back, now - entry.window_start});
      entry = Entry{now, 0, {}};
      ++it;
    } else {
      it = causes_.erase(it);  // quiet for a whole interval: forget it
    }
  }
  return due;
}

std::vector<RateLimiter::Summary> RateLimiter::Drain(Clock::time_point now) {
  std::vector<Summary> pending;
  for (auto& [cause, entry] : causes_) {
    if (entry.held_back > 0) {
      pending.push_back(
          {cause, std::move(entry.last_message), entry.held_back, now - entry.window_start});
    }
  }
  causes_.clear();
  return pending;
}

}  // namespace qcow2fs::fusefs
