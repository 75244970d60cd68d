#include "daemon/fair_queue.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace keyhold::daemon {
namespace {

// A gate the test opens: jobs block on it until then.
class Gate {
 public:
  void Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return open_; });
  }
  void Open() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      open_ = true;
    }
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

// Records the order in which jobs started.
class Log {
 public:
  void Add(int v) {
    std::lock_guard<std::mutex> lock(mu_);
    order_.push_back(v);
  }
  std::vector<int> order() {
    std::lock_guard<std::mutex> lock(mu_);
    return order_;
  }

 private:
  std::mutex mu_;
  std::vector<int> order_;
};

void WaitFor(const std::function<bool()>& done) {
  for (int i = 0; i < 5000 && !done(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ASSERT_TRUE(done());
}

// One uid floods the queue; another uid's single job runs next, not after
// the flood (first come, first served would put it last).
TEST(FairQueueTest, AQuietUidIsNotQueuedBehindAFlood) {
  boost::asio::thread_pool pool(1);
  FairQueue queue(pool, 1);
  Gate gate;
  Log log;
  queue.Post(1000, [&] {
    gate.Wait();
    log.Add(0);
  });
  WaitFor([&] { return queue.running() == 1; });
  for (int i = 1; i <= 20; ++i) {
    queue.Post(1000, [&log, i] { log.Add(i); });
  }
  queue.Post(2000, [&log] { log.Add(-1); });
  EXPECT_EQ(queue.queued(), 21u);
  gate.Open();
  pool.join();
  const std::vector<int> order = log.order();
  ASSERT_EQ(order.size(), 22u);
  EXPECT_EQ(order[0], 0);
  EXPECT_EQ(order[1], 1);   // uid 1000's turn came first: it queued first
  EXPECT_EQ(order[2], -1);  // then uid 2000's, before the rest of the flood
  for (std::size_t i = 3; i < order.size(); ++i) {
    EXPECT_EQ(order[i], static_cast<int>(i) - 1);  // a uid's own jobs: FIFO
  }
}

// Uids with work take turns: a, b, c, a, b, c, ...
TEST(FairQueueTest, UidsTakeTurns) {
  boost::asio::thread_pool pool(1);
  FairQueue queue(pool, 1);
  Gate gate;
  Log log;
  queue.Post(1, [&] { gate.Wait(); });
  WaitFor([&] { return queue.running() == 1; });
  for (int round = 0; round < 3; ++round) {
    for (int uid = 1; uid <= 3; ++uid) {
      queue.Post(static_cast<uint32_t>(uid),
                 [&log, uid, round] { log.Add(uid * 10 + round); });
    }
  }
  gate.Open();
  pool.join();
  EXPECT_EQ(log.order(),
            (std::vector<int>{10, 20, 30, 11, 21, 31, 12, 22, 32}));
}

// Never more jobs at once than slots, and every job runs, also when jobs
// throw.
TEST(FairQueueTest, RespectsSlotsAndSurvivesThrowingJobs) {
  boost::asio::thread_pool pool(4);
  FairQueue queue(pool, 2);
  std::atomic<int> now{0};
  std::atomic<int> peak{0};
  std::atomic<int> done{0};
  for (int i = 0; i < 200; ++i) {
    queue.Post(static_cast<uint32_t>(i % 7), [&, i] {
      const int n = ++now;
      int p = peak.load();
      while (n > p && !peak.compare_exchange_weak(p, n)) {
      }
      std::this_thread::sleep_for(std::chrono::microseconds(200));
      --now;
      ++done;
      if (i % 10 == 0) {
        throw std::runtime_error("job failed");
      }
    });
  }
  WaitFor([&] { return done.load() == 200; });
  pool.join();
  EXPECT_LE(peak.load(), 2);
  EXPECT_EQ(queue.queued(), 0u);
  EXPECT_EQ(queue.running(), 0u);
}

// A claimed slot counts like a running job: it keeps a posted job waiting
// until Release(), and nothing can be claimed while a job waits, so a claim
// never jumps the queue.
TEST(FairQueueTest, ClaimTakesAFreeSlotOnlyWhenNobodyWaits) {
  boost::asio::thread_pool pool(2);
  FairQueue queue(pool, 2);
  ASSERT_TRUE(queue.TryClaim());
  EXPECT_EQ(queue.running(), 1u);
  ASSERT_TRUE(queue.TryClaim());
  EXPECT_FALSE(queue.TryClaim());  // both slots taken
  std::atomic<bool> ran{false};
  queue.Post(7, [&] { ran = true; });
  EXPECT_EQ(queue.queued(), 1u);
  queue.Release();  // frees a slot: the posted job starts
  WaitFor([&] { return ran.load(); });
  WaitFor([&] { return queue.running() == 1; });

  // Uid 9's job waits for a slot: a claim is refused until it has run.
  Gate gate;
  queue.Post(8, [&] { gate.Wait(); });
  WaitFor([&] { return queue.running() == 2; });
  std::atomic<bool> waiting_ran{false};
  queue.Post(9, [&] { waiting_ran = true; });
  EXPECT_FALSE(queue.TryClaim());
  gate.Open();
  WaitFor([&] { return waiting_ran.load(); });
  WaitFor([&] { return queue.running() == 1; });
  EXPECT_TRUE(queue.TryClaim());  // the gate's slot is free again
  queue.Release();
  queue.Release();  // the second claim of the start
  pool.join();
  EXPECT_EQ(queue.running(), 0u);
  EXPECT_EQ(queue.queued(), 0u);
}

}  // namespace
}  // namespace keyhold::daemon
