/* Included once by each isa_<level>.c after it has set LL_ISA, LL_VBYTES and its target pragma:
 * compiles every op for that level and publishes them as the table ll_kernels_<level>. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "kernels.h"

#include "ops/embed.c"
#include "ops/layernorm.c"
#include "ops/linear.c"
#include "ops/linear_packed.c"
#include "ops/gelu.c"
#include "ops/residual.c"
#include "ops/kv_write.c"
#include "ops/attention.c"
#include "ops/decode_attention.c"
#include "ops/lm_head.c"
#include "ops/argmax.c"

const ll_kernels LL_CAT(ll_kernels, LL_ISA) = {
    .name = LL_ISA_NAME,
    .embed = LL_FN(embed),
    .layernorm = LL_FN(layernorm),
    .linear = LL_FN(linear),
    .pack_linear = LL_FN(pack_linear),
    .linear_packed = LL_FN(linear_packed),
    .gelu = LL_FN(gelu),
    .residual = LL_FN(residual),
    .kv_write = LL_FN(kv_write),
    .attention = LL_FN(attention),
    .decode_attention = LL_FN(decode_attention),
    .lm_head = LL_FN(lm_head),
    .argmax = LL_FN(argmax),
};
