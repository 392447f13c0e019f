// Unit tests for the rate limiter behind the daemon's log.
#include "rate_limiter.h"

#include <gtest/gtest.h>

#include <string>

namespace qcow2fs::fusefs {
namespace {

using Clock = RateLimiter::Clock;
using std::chrono::seconds;

TEST(CauseOf, NumbersDoNotMakeACause) {
  EXPECT_EQ(CauseOf("write at guest offset 1048576 failed: No space"),
            CauseOf("write at guest offset 2097152 failed: No space"));
  EXPECT_EQ(CauseOf("L2 entry 3 at 0x7f000 is bad"), "L# entry # at # is bad");
  EXPECT_NE(CauseOf("write at 1 failed: No space left on device"),
            CauseOf("write at 1 failed: Input/output error"));
  EXPECT_EQ(CauseOf(""), "");
  EXPECT_EQ(CauseOf("0x"), "#x");  // not a hex number: just a digit
}

TEST(RateLimiter, FirstOfACausePrintsThenOneSummaryPerInterval) {
  RateLimiter limiter(seconds(60));
  Clock::time_point t0{};
  EXPECT_TRUE(limiter.Admit("a", "a 1", t0));
  // 1000 failures within the minute: none printed, none due yet.
  for (int i = 0; i < 1000; ++i) {
    EXPECT_FALSE(limiter.Admit("a", "a " + std::to_string(i), t0 + seconds(i % 59)));
  }
  EXPECT_TRUE(limiter.Due(t0 + seconds(59)).empty());
  // The minute is over: one summary with the count and the latest message.
  auto due = limiter.Due(t0 + seconds(60));
  ASSERT_EQ(due.size(), 1u);
  EXPECT_EQ(due[0].repeated, 1000u);
  EXPECT_EQ(due[0].last_message, "a 999");
  EXPECT_EQ(due[0].Text(), "a 999 (repeated 1000 times in 60 s)");
  EXPECT_TRUE(limiter.Due(t0 + seconds(61)).empty());
  // A summary starts a new interval: the next failure is held back again.
  EXPECT_FALSE(limiter.Admit("a", "a x", t0 + seconds(70)));
  EXPECT_TRUE(limiter.Due(t0 + seconds(119)).empty());
  ASSERT_EQ(limiter.Due(t0 + seconds(120)).size(), 1u);
}

TEST(RateLimiter, CausesAreIndependent) {
  RateLimiter limiter(seconds(60));
  Clock::time_point t0{};
  EXPECT_TRUE(limiter.Admit("enospc", "m", t0));
  EXPECT_TRUE(limiter.Admit("eio", "m", t0));
  EXPECT_FALSE(limiter.Admit("enospc", "m", t0 + seconds(1)));
  auto due = limiter.Due(t0 + seconds(61));
  ASSERT_EQ(due.size(), 1u);
  EXPECT_EQ(due[0].cause, "enospc");
}

TEST(RateLimiter, AQuietIntervalStartsAfresh) {
  RateLimiter limiter(seconds(60));
  Clock::time_point t0{};
  EXPECT_TRUE(limiter.Admit("a", "m", t0));
  EXPECT_TRUE(limiter.Due(t0 + seconds(90)).empty());  // and forgets "a"
  EXPECT_EQ(limiter.tracked_causes(), 0u);
  EXPECT_TRUE(limiter.Admit("a", "m", t0 + seconds(91)));
  // Without Due() in between, a quiet interval also lets the next one print.
  EXPECT_TRUE(limiter.Admit("a", "m", t0 + seconds(200)));
}

TEST(RateLimiter, LateOccurrenceJoinsTheDueSummary) {
  RateLimiter limiter(seconds(60));
  Clock::time_point t0{};
  EXPECT_TRUE(limiter.Admit("a", "m1", t0));
  EXPECT_FALSE(limiter.Admit("a", "m2", t0 + seconds(10)));
  // The interval is over and one is held back: this one is not printed on
  // its own but counted into the summary that is due now.
  EXPECT_FALSE(limiter.Admit("a", "m3", t0 + seconds(65)));
  auto due = limiter.Due(t0 + seconds(65));
  ASSERT_EQ(due.size(), 1u);
  EXPECT_EQ(due[0].repeated, 2u);
  EXPECT_EQ(due[0].last_message, "m3");
}

TEST(RateLimiter, DrainReportsEverythingHeldBack) {
  RateLimiter limiter(seconds(60));
  Clock::time_point t0{};
  limiter.Admit("a", "a", t0);
  limiter.Admit("a", "a", t0 + seconds(1));
  limiter.Admit("b", "b", t0);
  auto pending = limiter.Drain(t0 + seconds(2));
  ASSERT_EQ(pending.size(), 1u);
  EXPECT_EQ(pending[0].Text(), "a (repeated 1 time in 2 s)");
  EXPECT_EQ(limiter.tracked_causes(), 0u);
  EXPECT_TRUE(limiter.Drain(t0 + seconds(3)).empty());
}

TEST(RateLimiter, BoundedNumberOfCauses) {
  RateLimiter limiter(seconds(60), 4);
  Clock::time_point t0{};
  for (int i = 0; i < 4; ++i) {
    EXPECT_TRUE(limiter.Admit(std::to_string(i), "m", t0));
  }
  // Further causes share one entry: the first prints, the rest are counted.
  EXPECT_TRUE(limiter.Admit("new1", "n1", t0));
  EXPECT_EQ(limiter.tracked_causes(), 4u + 1u);
  for (int i = 0; i < 100; ++i) {
    EXPECT_FALSE(limiter.Admit("new" + std::to_string(i + 2), "n", t0));
  }
  EXPECT_EQ(limiter.tracked_causes(), 5u);
  auto pending = limiter.Drain(t0 + seconds(1));
  ASSERT_EQ(pending.size(), 1u);
  EXPECT_EQ(pending[0].repeated, 100u);
  // Causes quiet for an interval make room again.
  for (int i = 0; i < 4; ++i) limiter.Admit(std::to_string(i), "m", t0);
  EXPECT_TRUE(limiter.Admit("late", "m", t0 + seconds(61)));
  EXPECT_LE(limiter.tracked_causes(), 4u);
}

}  // namespace
}  // namespace qcow2fs::fusefs
