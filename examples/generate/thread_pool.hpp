// thread_pool.hpp - the CPU engine's threads, lent to the library's host
// scoring as a pyramidinfer::ParallelFor.
//
// Workers sleep on a condition variable between calls, so they take no CPU
// from OpenBLAS's threads while the engine multiplies (OpenMP's spinning
// workers did: they slowed the engine's prefill by 15-25% on 2 cores). The
// calling thread runs tasks too.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include <pyramidinfer/core/parallel.hpp>

namespace pyramidinfer::llama {

class ThreadPool {
 public:
  /// `threads` in all, the caller included (at least 1).
  explicit ThreadPool(int threads) {
    for (int i = 1; i < std::max(threads, 1); ++i) workers_.emplace_back([this] { work(); });
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(m_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int threads() const { return int(workers_.size()) + 1; }

  /// body(i) for i in [0, tasks), on every thread; returns when all are done
  /// and rethrows the first exception a task threw. One call at a time (the
  /// engine's thread); a task must not call it again.
  void parallel_for(int tasks, const std::function<void(int)>& body) {
    if (tasks <= 0) return;
    std::unique_lock<std::mutex> lock(m_);
    body_ = &body, tasks_ = tasks, next_ = 0, running_ = int(workers_.size()), error_ = nullptr;
    ++generation_;
    lock.unlock();
    wake_.notify_all();
    run_tasks();
    lock.lock();
    done_.wait(lock, [this] { return running_ == 0; });
    body_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

  /// This pool as the library's ParallelFor (the pool must outlive its use).
  ParallelFor as_parallel_for() {
    return [this](int tasks, const std::function<void(int)>& body) { parallel_for(tasks, body); };
  }

 private:
  void run_tasks() {
    for (int i; (i = next_.fetch_add(1)) < tasks_;) {
      try {
        (*body_)(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(m_);
        if (!error_) error_ = std::current_exception();
      }
    }
  }

  void work() {
    long long seen = 0;
    for (;;) {
      std::unique_lock<std::mutex> lock(m_);
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      lock.unlock();
      run_tasks();
      lock.lock();
      if (--running_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex m_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* body_ = nullptr;
  int tasks_ = 0, running_ = 0;
  std::atomic<int> next_{0};
  long long generation_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

}  // namespace pyramidinfer::llama
