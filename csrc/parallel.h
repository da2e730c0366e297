/* Below what size an op runs on one thread.
 *
 * Why: opening an OpenMP parallel region (waking the team, the barrier at its end) costs microseconds, as
 * much as a few tens of thousands of FMAs or float copies; an op smaller than that is faster alone. Decode
 * calls every op at T = 1, so the small ones (a tiny model's matrices, early positions' attention) would
 * otherwise pay more for the threads than for the work. Sizes are in floats (or multiply-adds) of the
 * op's work; the split never changes a result's bits, only its speed.
 */
#ifndef LLORCH_PARALLEL_H
#define LLORCH_PARALLEL_H

#define LL_PAR_ATTENTION 16384   /* attention: q.k and p.v multiply-adds, NH T S HS */
#define LL_PAR_DECODE    16384   /* decode_attention: cached floats read, sum of (pos + 1) NH HS */
#define LL_PAR_GELU      16384   /* gelu: elements (each an exp and a divide) */
#define LL_PAR_GEMV      32768   /* linear_packed at T = 1: weight floats streamed, C OC */
#define LL_PAR_PACK      65536   /* pack_linear: weight floats copied (once per matrix, at load) */

#endif
