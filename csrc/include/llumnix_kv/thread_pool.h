// A small persistent thread pool for splitting one job into indexed tasks.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace llumnix_kv {

class ThreadPool {
 public:
  // Upper bound on the number of workers any pool will start.
  static constexpr unsigned kMaxThreads = 64;
  // Default number of threads when a caller asks for 0: hardware
  // concurrency, capped (memory bandwidth saturates well before 64).
  static unsigned default_threads();

  ThreadPool() = default;
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Runs task(i) for every i in [0, count) on up to `parallelism` threads,
  // the calling thread included, and returns when all tasks have finished.
  // The first exception thrown by a task is rethrown here.
  void run(std::size_t count, unsigned parallelism, const std::function<void(std::size_t)>& task);

  // Number of worker threads started so far.
  unsigned size();

  // The process-wide pool, created on first use (and again in a forked
  // child, whose copy of the parent's pool has no threads).
  static ThreadPool& global();

 private:
  struct Job;
  void ensure_workers(unsigned n);
  void worker_loop();
  static void drain(Job& job);

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> queue_;
  std::vector<std::thread> workers_;
  bool stop_ = false;
};

}  // namespace llumnix_kv
