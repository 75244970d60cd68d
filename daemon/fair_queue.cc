#include "daemon/fair_queue.h"

#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <boost/asio/post.hpp>
#include <exception>
#include <utility>

#include "daemon/log.h"

namespace keyhold::daemon {

namespace {
spdlog::logger& Log() {
  static const auto logger = keyhold::daemon::ComponentLog("pool");
  return *logger;
}

constexpr int kPoolNice = 10;

// Once per pool thread: below the I/O threads for the CPU scheduler (Linux
// applies PRIO_PROCESS with a thread id to that thread only).
void LowerThisThreadsPriority() {
  thread_local bool done = false;
  if (done) {
    return;
  }
  done = true;
  const auto tid = static_cast<id_t>(::syscall(SYS_gettid));
  if (::setpriority(PRIO_PROCESS, tid, kPoolNice) != 0) {
    Log().debug("cannot lower the priority of a pool thread");
  }
}

}  // namespace

FairQueue::FairQueue(boost::asio::thread_pool& pool, unsigned slots)
    : pool_(pool), slots_(slots == 0 ? 1 : slots) {}

void FairQueue::Post(uint32_t uid, std::function<void()> job) {
  std::lock_guard<std::mutex> lock(mu_);
  std::deque<std::function<void()>>& queue = queues_[uid];
  if (queue.empty()) {
    turns_.push_back(uid);
  }
  queue.push_back(std::move(job));
  StartLocked();
}

bool FairQueue::TryClaim() {
  std::lock_guard<std::mutex> lock(mu_);
  if (running_ >= slots_ || !turns_.empty()) {
    return false;
  }
  ++running_;
  return true;
}

void FairQueue::Release() {
  std::lock_guard<std::mutex> lock(mu_);
  --running_;
  StartLocked();
}

std::size_t FairQueue::queued() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::size_t n = 0;
  for (const auto& [uid, queue] : queues_) {
    n += queue.size();
  }
  return n;
}

unsigned FairQueue::running() const {
  std::lock_guard<std::mutex> lock(mu_);
  return running_;
}

void FairQueue::StartLocked() {
  while (running_ < slots_ && !turns_.empty()) {
    const uint32_t uid = turns_.front();
    turns_.pop_front();
    auto it = queues_.find(uid);
    std::function<void()> job = std::move(it->second.front());
    it->second.pop_front();
    if (it->second.empty()) {
      queues_.erase(it);
    } else {
      turns_.push_back(uid);  // its next job waits for the others' turns
    }
    ++running_;
    boost::asio::post(pool_, [this, job = std::move(job)] { Run(job); });
  }
}

void FairQueue::Run(const std::function<void()>& job) {
  LowerThisThreadsPriority();
  try {
    job();
  } catch (const std::exception& e) {
    Log().error("blocking job failed: {}", e.what());
  } catch (...) {
    Log().error("blocking job failed");
  }
  Release();
}

}  // namespace keyhold::daemon
