// The one list of compiled window_attn variants: the launcher's dispatch and its argument check
// both expand it, so adding a head dim here adds its kernels (fp16, bf16 and fp32; window and
// long paths) everywhere.
#pragma once

// QK_WINDOW_ATTN_HEAD_DIMS(X): X(D) for every supported head_dim.
#define QK_WINDOW_ATTN_HEAD_DIMS(X) X(64) X(80) X(128)
