#include "llumnix_kv/thread_pool.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <exception>

namespace llumnix_kv {

struct ThreadPool::Job {
  std::function<void(std::size_t)> task;
  std::size_t count = 0;
  std::atomic<std::size_t> next{0};
  std::atomic<std::size_t> done{0};
  std::mutex mu;
  std::condition_variable cv;
  std::exception_ptr error;
};

unsigned ThreadPool::default_threads() {
  unsigned hw = std::thread::hardware_concurrency();
  if (hw == 0) hw = 4;
  return std::min(hw, 16u);
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) {
    if (t.joinable()) t.join();
  }
}

unsigned ThreadPool::size() {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<unsigned>(workers_.size());
}

void ThreadPool::ensure_workers(unsigned n) {
  n = std::min(n, kMaxThreads);
  std::lock_guard<std::mutex> lock(mu_);
  while (workers_.size() < n) {
    workers_.emplace_back([this] { worker_loop(); });
  }
}

void ThreadPool::drain(Job& job) {
  std::size_t finished = 0;
  for (;;) {
    std::size_t i = job.next.fetch_add(1, std::memory_order_relaxed);
    if (i >= job.count) break;
    try {
      job.task(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(job.mu);
      if (!job.error) job.error = std::current_exception();
    }
    ++finished;
  }
  if (finished == 0) return;
  if (job.done.fetch_add(finished, std::memory_order_acq_rel) + finished == job.count) {
    std::lock_guard<std::mutex> lock(job.mu);
    job.cv.notify_all();
  }
}

void ThreadPool::worker_loop() {
  for (;;) {
    std::shared_ptr<Job> job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
      if (stop_) return;
      job = std::move(queue_.front());
      queue_.pop_front();
    }
    drain(*job);
  }
}

void ThreadPool::run(std::size_t count, unsigned parallelism, const std::function<void(std::size_t)>& task) {
  if (count == 0) return;
  unsigned helpers = static_cast<unsigned>(std::min<std::size_t>(count, std::max(parallelism, 1u))) - 1;
  helpers = std::min(helpers, kMaxThreads);
  if (helpers == 0) {
    for (std::size_t i = 0; i < count; ++i) task(i);
    return;
  }
  ensure_workers(helpers);
  auto job = std::make_shared<Job>();
  job->task = task;
  job->count = count;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (unsigned i = 0; i < helpers; ++i) queue_.push_back(job);
  }
  if (helpers == 1) {
    cv_.notify_one();
  } else {
    cv_.notify_all();
  }
  drain(*job);
  {
    std::unique_lock<std::mutex> lock(job->mu);
    job->cv.wait(lock, [&] { return job->done.load(std::memory_order_acquire) == job->count; });
  }
  if (job->error) std::rethrow_exception(job->error);
}

namespace {

ThreadPool* g_pool = nullptr;
std::mutex g_pool_mu;
std::once_flag g_atfork_once;

void reset_after_fork() {
  // The child has only the forking thread: the parent's workers do not
  // exist here, and the pool's mutexes may be held by them. Abandon the
  // old pool (never destroy it) and start fresh on next use.
  g_pool = nullptr;
  new (&g_pool_mu) std::mutex();
}

}  // namespace

ThreadPool& ThreadPool::global() {
  std::call_once(g_atfork_once, [] { pthread_atfork(nullptr, nullptr, reset_after_fork); });
  std::lock_guard<std::mutex> lock(g_pool_mu);
  if (g_pool == nullptr) g_pool = new ThreadPool();  // lives until exit, never joined at shutdown
  return *g_pool;
}

}  // namespace llumnix_kv
