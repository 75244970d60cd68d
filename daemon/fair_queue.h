// FairQueue: the blocking pool shared fairly between uids.
//
// Work that may wait (key generation, store writes, device backends) runs on
// a fixed pool. Posted straight to the pool it runs first come, first
// served, so one uid queueing a hundred RSA-4096 generations would make
// every other uid wait behind them (Parsec U-0). Here each uid has its own
// FIFO and the uids with work take turns for the pool's threads: a job
// posted by a quiet uid starts as soon as any thread is free, whatever the
// others have queued.
//
// Pool threads also run at a lower CPU priority (nice 10) than the I/O
// threads, so cheap operations answered on the I/O threads (software
// signatures) keep their share of the cores while the pool is busy.
//
// Thread-safe.
#ifndef KEYHOLD_DAEMON_FAIR_QUEUE_H_
#define KEYHOLD_DAEMON_FAIR_QUEUE_H_

#include <boost/asio/thread_pool.hpp>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <mutex>

namespace keyhold::daemon {

class FairQueue {
 public:
  // slots: how many jobs may run at once (the pool's thread count).
  FairQueue(boost::asio::thread_pool& pool, unsigned slots);
  FairQueue(const FairQueue&) = delete;
  FairQueue& operator=(const FairQueue&) = delete;

  // Runs job on the pool once a slot is free and it is uid's turn.
  void Post(uint32_t uid, std::function<void()> job);

  // For a caller that would rather run a short job on its own thread than
  // hand it over (an I/O thread with a device-key signature, see
  // server.h): claims a slot if one is free and no uid is waiting for one,
  // so nobody's turn is skipped. A true answer must be paired with
  // Release() once the job is done.
  bool TryClaim();
  void Release();

  // Jobs posted but not started yet, and jobs running.
  std::size_t queued() const;
  unsigned running() const;

 private:
  void StartLocked();  // starts jobs while slots are free; mu_ held
  void Run(const std::function<void()>& job);

  boost::asio::thread_pool& pool_;
  const unsigned slots_;
  mutable std::mutex mu_;
  unsigned running_ = 0;
  std::map<uint32_t, std::deque<std::function<void()>>> queues_;
  std::deque<uint32_t> turns_;  // uids with queued jobs, next first
};

}  // namespace keyhold::daemon

#endif  // KEYHOLD_DAEMON_FAIR_QUEUE_H_
