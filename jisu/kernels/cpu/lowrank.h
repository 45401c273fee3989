// Low-rank terms on top of a linear (jisu/kernels/lowrank.py): y += A (B x), with B int8 [R, K]
// (one f32 scale per row) and A int8 (one f32 scale per row) stored per segment of rows as tiles
// of 8 rows, [r][8] codes each (k-major, so that 8 rows take one vector). A joined q|k|v or
// gate|up has one segment per part: rows of segment s read u = B x at [s r, (s + 1) r).
#pragma once
#include <cstdint>
#include <vector>

namespace jisu {

struct LowRank {
  int64_t N = 0, K = 0, r = 0;
  const int8_t* b = nullptr;     // [nseg * r, K]
  const float* sb = nullptr;     // [nseg * r]
  const int8_t* a = nullptr;     // per segment ceil(rows / 8) tiles of [r][8]
  const float* sa = nullptr;     // [N]
  std::vector<int64_t> seg_rows;
  std::vector<int64_t> tile_row, tile_end, tile_seg;  // each tile's first row, row end, segment

  // Checks the sizes and lays out the tiles; throws std::invalid_argument.
  void init();
  int64_t u_size() const { return (int64_t)seg_rows.size() * r; }
};

// y[t * ldy + n] += sa[n] * sum_j A[n, j] u[t, s r + j] with u[t, i] = sb[i] * sum_k B[i, k] x[t * K + k],
// for t < T; u: scratch of T * u_size() floats. Each token's sums run in a fixed order, whatever T
// and the thread split (the step's batch invariance).
void lowrank_add(const LowRank& L, const float* x, int64_t T, float* y, int64_t ldy, float* u);

}  // namespace jisu
