// Work shared out on demand between the intra-op threads, instead of at::parallel_for's equal split.
//
// On the shared 2-core VMs this project is measured on, each core's speed varies on its own (0.4-1.4 bf16
// TFLOP/s per core, for seconds at a time; docs/benchmarks.md, twelfth round): with an equal split the
// faster core waits for the slower one. Here a thread takes the next piece of the range when it is done
// with its last one, so a faster core takes more pieces.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace nmt {

// The pieces of [begin, end), `piece` items each, as the threads ask for them.
class Pieces {
 public:
  Pieces(int64_t begin, int64_t end, int64_t piece) : next_(begin), end_(end), piece_(piece) {}
  // the next piece [first, last); false when none is left
  bool take(int64_t& first, int64_t& last) {
    first = next_.fetch_add(piece_, std::memory_order_relaxed);
    if (first >= end_) return false;
    last = std::min(end_, first + piece_);
    return true;
  }

 private:
  std::atomic<int64_t> next_;
  const int64_t end_, piece_;
};

// Runs worker(pieces) once per thread (at most one thread per piece), each taking pieces of [begin, end)
// until none is left: per-thread set-up (buffers, AMX tiles) goes before its loop over pieces.take.
template <class Worker>
void parallel_pieces(int64_t begin, int64_t end, int64_t piece, const Worker& worker) {
  Pieces pieces(begin, end, piece);
  const int64_t count = end > begin ? (end - begin + piece - 1) / piece : 0;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), count));
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
    for (int64_t thread = first; thread < last; ++thread) worker(pieces);
  });
}

// at::parallel_for(begin, end, ..., body) with the range handed out in pieces of `piece` items on demand.
template <class Body>
void parallel_for_pieces(int64_t begin, int64_t end, int64_t piece, const Body& body) {
  parallel_pieces(begin, end, piece, [&](Pieces& pieces) {
    for (int64_t first, last; pieces.take(first, last);) body(first, last);
  });
}

}  // namespace nmt
