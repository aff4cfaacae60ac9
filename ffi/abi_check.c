// Compile-time guard: DSpark's ggml device (src/ggml) implements the backend interface of
// ggml-backend-impl.h at one API version. The Rust layouts are generated from this header by
// build.rs; this check stops the build when the interface version itself moves, because
// the meaning of the callbacks (not only their layout) then needs a review.
#include "ggml-backend-impl.h"

_Static_assert(GGML_BACKEND_API_VERSION == DSPARK_EXPECTED_BACKEND_API_VERSION,
               "ggml's backend interface version changed: review src/ggml against ggml-backend-impl.h");

// A symbol so the archive is not empty.
int dspark_abi_check_api_version(void) { return GGML_BACKEND_API_VERSION; }
