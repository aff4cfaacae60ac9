/**
 * \file dspark.h
 * \brief DSpark's C API: a compressed, paged KV cache and attention backend for llama.cpp.
 *
 * Two ways to use it:
 *  - **Inside llama.cpp** (section "Registration"): call dspark_register() before loading a
 *    model and pass the returned device in `llama_model_params.devices`; llama.cpp then keeps
 *    the KV cache of every offloaded layer compressed on the `DSPARK0` device.
 *  - **Standalone** (section "Cache"), for runtimes that are not llama.cpp: create a
 *    dspark_cache_t for a model shape, append K/V rows, run attention on the compressed rows,
 *    edit sequences, save and load.
 *
 * Link with `libdspark.a` (static; it contains llama.cpp and ggml, built with
 * OpenMP, so also link `-lstdc++ -lm -lpthread -ldl -lgomp`) or `libdspark.so`.
 *
 * \par Conventions
 *  - **Errors.** Every fallible function returns a ::dspark_status: #DSPARK_OK (0) on success,
 *    a negative code on failure. On failure, out-parameters are left untouched (exceptions are
 *    documented) and dspark_last_error() describes the failure. No function aborts or unwinds
 *    on bad input: NULL pointers, wrong `size` fields, out-of-range layers or sequences, bad
 *    format names and stale handles all return an error code.
 *  - **Versioned structs.** Structs the caller fills or receives start with a `size` field.
 *    Set it to `sizeof(the struct)` (the `*_init` functions do that and fill the defaults).
 *    A library newer than the header accepts an older, smaller struct; an older library
 *    accepts a newer, larger one only if the fields it does not know are zero.
 *  - **Ownership.** No function takes ownership of memory the caller passes, or keeps a
 *    pointer to it after returning. Handles are created by `_new` and released by `_delete`.
 *    Strings returned by the library are owned by it; their lifetime is documented per
 *    function.
 *  - **Threads.** All functions may be called from any thread. Functions that take a
 *    `const dspark_cache_t *` only read the cache and may run concurrently on one cache;
 *    functions that take a non-const handle modify it and are serialised internally (they
 *    wait for readers to finish), so misuse is never a data race.
 *  - **Handles.** A dspark_cache_t pointer is an opaque token, never dereferenced by the
 *    caller or the library: every call looks it up among the live caches, so a call on a
 *    deleted (or never created) handle returns #DSPARK_ERR_HANDLE instead of crashing.
 *  - **Units.** Token counts, positions and cells are counted in tokens; sizes in bytes;
 *    tensors are dense, row-major, f32 unless stated otherwise.
 */
#ifndef DSPARK_H
#define DSPARK_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ===================================================================================== */
/** \name Version                                                                        */
/* ===================================================================================== */
/**@{*/

/** Major version of this header (the crate's semantic version). */
#define DSPARK_VERSION_MAJOR 0
/** Minor version of this header. */
#define DSPARK_VERSION_MINOR 1
/** Patch version of this header. */
#define DSPARK_VERSION_PATCH 0
/** The version as one number: major * 1000000 + minor * 1000 + patch. */
#define DSPARK_VERSION \
    (DSPARK_VERSION_MAJOR * 1000000 + DSPARK_VERSION_MINOR * 1000 + DSPARK_VERSION_PATCH)
/** Version of the C API itself; it grows when a function or struct field is added. */
#define DSPARK_API_VERSION 5

/**
 * \brief The version of the linked library, encoded like #DSPARK_VERSION.
 *
 * Compare it with #DSPARK_VERSION to detect a header/library mismatch.
 * \return The library version. Never fails.
 */
uint32_t dspark_version(void);

/**
 * \brief The version of the linked library as a string, e.g. "0.1.0".
 * \return A static NUL-terminated string owned by the library, valid for the life of the
 *         process. Never NULL.
 */
const char *dspark_version_string(void);

/**@}*/

/* ===================================================================================== */
/** \name Errors                                                                         */
/* ===================================================================================== */
/**@{*/

/** Status codes. 0 is success; every error is negative. New codes may be added. */
typedef enum dspark_status {
    DSPARK_OK = 0,               /**< Success. */
    DSPARK_ERR_NULL = -1,        /**< A required pointer argument was NULL. */
    DSPARK_ERR_SIZE = -2,        /**< A struct's `size` field is too small, or too large with
                                      non-zero fields this library does not know. */
    DSPARK_ERR_ARG = -3,         /**< An argument is invalid (shape, count, parameter value). */
    DSPARK_ERR_RANGE = -4,       /**< A layer, sequence or position is out of range. */
    DSPARK_ERR_FORMAT = -5,      /**< Unknown KV format name. */
    DSPARK_ERR_HANDLE = -6,      /**< The handle is not a live cache (deleted or never created). */
    DSPARK_ERR_FULL = -7,        /**< The sequence has no room left (max_tokens reached). */
    DSPARK_ERR_IO = -8,          /**< A file could not be opened, read or written. */
    DSPARK_ERR_CORRUPT = -9,     /**< Saved data is truncated, corrupt or not a DSpark cache. */
    DSPARK_ERR_MISMATCH = -10,   /**< Saved data is valid but for another shape or format. */
    DSPARK_ERR_VERSION = -11,    /**< Saved data has a file-format version this library does
                                      not read (a newer one, or an older one no longer read). */
    DSPARK_ERR_BUFFER = -12,     /**< The caller's output buffer is too small. */
    DSPARK_ERR_INTERNAL = -13    /**< An internal error (a bug); the call had no effect or
                                      its effect is documented as unspecified. */
} dspark_status;

/**
 * \brief The message of the last failed call on the calling thread.
 *
 * Every dspark_ function except dspark_last_error(), dspark_status_name(), dspark_version()
 * and dspark_version_string() clears the message when it succeeds and sets it when it fails.
 * \return A NUL-terminated string owned by the library, "" if the last call succeeded. It is
 *         valid until the next dspark_ call on the same thread. Never NULL.
 */
const char *dspark_last_error(void);

/**
 * \brief The name of a status code, e.g. "DSPARK_ERR_RANGE".
 * \param status Any value; unknown values give "DSPARK_ERR_UNKNOWN".
 * \return A static string owned by the library, valid for the life of the process.
 */
const char *dspark_status_name(int status);

/**@}*/

/* ===================================================================================== */
/** \name Registration into llama.cpp                                                    */
/* ===================================================================================== */
/**@{*/

/* ggml's device object (ggml_backend_dev_t is `struct ggml_backend_device *`). Declared here
 * so that this header does not need ggml's headers. */
struct ggml_backend_device;

/** How a DSpark device stores the KV caches that llama.cpp allocates on it. */
typedef struct dspark_config {
    /** Set to `sizeof(dspark_config)` (dspark_config_init() does). */
    size_t size;
    /** KV format name: "f16" (paged, uncompressed) or "k<b>v<b>" with b from 2 to 8
     *  (bits per K and V code), e.g. "k4v4". Names are exact and lowercase: nothing else is
     *  accepted (not "K4V4", "F16", " k4v4", "k04v4" or "k+4v4"). NULL means "k4v4". Copied;
     *  the library does not keep the pointer. A device's compressed pages are centred (each
     *  holds its rows' mean per head as one 8-bit row, ~0.13 bit per value, for less error);
     *  the standalone cache of dspark_cache_create() does not centre its pages. */
    const char *format;
    /** Most recent tokens of each sequence kept in f16 before they are compressed (rounded
     *  up to whole 64-token pages). Default 128. */
    uint32_t window;
    /* Appended in API version 3 (a caller built against an older header passes the smaller
     * size and gets the defaults for these). */
    /** Most bytes of KV pages the device's caches hold in RAM together; compressed pages
     *  beyond it move to a spill file (folder: $DSPARK_SPILL_DIR, else the system temp
     *  folder), least recently attended first. The f16 sinks and window never move. 0 (the
     *  default): no budget. */
    uint64_t kv_budget_bytes;
    /** With a budget: layers ahead whose cold pages a transfer thread reads while attention
     *  runs; 0 reads them when a layer needs them. Default 2. */
    uint32_t prefetch_depth;
    /* Appended in API version 4 (a uint64_t first: version 3's struct had 4 bytes of padding
     * after prefetch_depth, which an old caller passes uninitialised). */
    /** Page selection: a decode step's attention reads, per layer and KV head, the sink page,
     *  the f16 window and the compressed pages whose key digests score best for its query,
     *  up to this many tokens; the other pages are not read (nor, with a budget, fetched
     *  from the spill file). 0 (the default): every token. Prefill is always dense. */
    uint64_t attn_budget_tokens;
    /** Layers, from the first, that stay dense under an attention budget. Default 0 (on the
     *  default model, keeping the first 2 dense changed the KL divergence by 0.0003 and
     *  would double the attention reads at depth 32768). */
    uint32_t attn_dense_layers;
    /* Appended in API version 5. */
    /** Path of a profile of per-layer K/V widths written by `dspark calibrate`; it replaces
     *  `format`, and `window` by the window it was made for. NULL (the default): none. Read when the device is registered (a file that
     *  is missing, of another version or names an unknown width is refused with
     *  #DSPARK_ERR_FORMAT); a model whose layers or KV rows do not match it fails to
     *  allocate its KV cache, with the reason in ggml's log. */
    const char *profile;
} dspark_config;

/**
 * \brief Fills `config` with the defaults ("k4v4", window 128) and sets its `size`.
 * \param config The struct to fill. Must not be NULL.
 * \return #DSPARK_OK, or #DSPARK_ERR_NULL.
 */
dspark_status dspark_config_init(dspark_config *config);

/**
 * \brief Registers DSpark with ggml and returns the device for a configuration.
 *
 * Each configuration is its own device, so the format of a KV cache is fixed by the device
 * its model was loaded with and two formats in one process never mix. The first
 * configuration gets `DSPARK0` (the registry is registered with ggml once per process, with
 * the devices it has then); a call with another configuration returns a new device
 * (`DSPARK1`, ...), which ggml reaches through the registry but does not add to its own
 * device list (that list has no lock, and llama.cpp walks it while it loads a model or makes
 * a context); a call with a configuration already seen returns that device again. Make the
 * first call before other threads load models: it changes ggml's list. It touches no other
 * state of the host: llama.cpp's log callback stays the host's, and DSpark's messages go
 * through it. Pass the device in `llama_model_params.devices` (a
 * NULL-terminated array) with `offload_kqv` and flash attention enabled and the KV types left
 * at f16: DSpark compresses the KV itself.
 * \param config The configuration, or NULL for the defaults. Not retained.
 * \param out_dev Receives the device (`ggml_backend_dev_t`); it lives for the whole process
 *        and must not be freed. Must not be NULL.
 * \return #DSPARK_OK; #DSPARK_ERR_NULL, #DSPARK_ERR_SIZE or #DSPARK_ERR_FORMAT.
 */
dspark_status dspark_register(const dspark_config *config, struct ggml_backend_device **out_dev);

/** Live figures of a KV cache (see dspark_stats() and dspark_cache_stats()). */
typedef struct dspark_stats {
    /** Set before the call, usually to `sizeof(dspark_stats)`; at least `sizeof(size_t)`.
     *  Only the fields that fit whole in `size` bytes are written (an older, smaller struct
     *  gets its fields); bytes beyond this library's struct are zeroed. */
    size_t size;
    /** Bytes held by KV pages (K and V, all layers), page metadata included. */
    uint64_t kv_bytes;
    /** Pages allocated in f16 (attention sinks, recent window). */
    uint64_t pages_f16;
    /** Pages allocated compressed. */
    uint64_t pages_compressed;
    /** Cells (tokens x layers x {K, V} stores) that hold data. */
    uint64_t cells;
    /** K and V values stored (cells x values per cell). */
    uint64_t elems;
    /** Stored bits per K/V value, all metadata included (16 for f16); 0 when empty. */
    double bits_per_elem;
    /** Compression ratio against an f16 cache of the same cells (16 / bits_per_elem);
     *  0 when empty. */
    double compression_ratio;
    /** Attention calls run so far (FLASH_ATTN_EXT ops for the device, dspark_cache_attn()
     *  calls for a cache). */
    uint64_t attn_calls;
    /* Appended in API version 3: the memory budget's figures (without a budget, and for a
     * standalone cache, which has none: zero, and hidden_fraction 1). */
    /** Bytes of KV pages in the spill file (not in kv_bytes). */
    uint64_t kv_cold_bytes;
    /** Bytes read from and written to the spill file so far. */
    uint64_t cold_read_bytes;
    uint64_t cold_write_bytes;
    /** Seconds the transfer stream spent reading cold pages, and seconds attention waited
     *  for them; hidden_fraction = 1 - wait / busy (1 when nothing was read). */
    double transfer_busy_s;
    double compute_wait_s;
    double hidden_fraction;
    /* Appended in API version 4: page selection's figures (the standalone cache: zero, and
     * prefetch_hit_rate 1). */
    /** Tokens a decode attention call read per layer and KV head, on average (every visible
     *  token without an attention budget). */
    double attended_tokens;
    /** Seconds spent choosing pages. */
    double select_s;
    /** Cold pages a decode call needed that the transfer stream had already read (1 when
     *  none was needed). */
    double prefetch_hit_rate;
} dspark_stats;

/**
 * \brief Live figures of all KV caches held by DSpark devices (all llama.cpp contexts).
 * \param out Receives the figures; set `out->size` first (see dspark_stats). Must not be
 *        NULL.
 * \return #DSPARK_OK; #DSPARK_ERR_NULL or #DSPARK_ERR_SIZE (`size` below `sizeof(size_t)`).
 */
dspark_status dspark_stats_get(dspark_stats *out);

/**@}*/

/* ===================================================================================== */
/** \name Cache: a standalone compressed KV cache                                        */
/* ===================================================================================== */
/**@{*/

/**
 * \brief A compressed KV cache for every layer of one model, with `n_seq_max` sequences.
 *
 * Each (layer, sequence) holds tokens at positions 0 .. max_tokens - 1: the K and V rows of
 * a token, `n_head_kv x head_dim` values each. Rows are appended at the end (the position
 * after the last one, see dspark_cache_seq_len()); dspark_cache_seq_rm() removes positions
 * and dspark_cache_seq_add() moves tokens to other positions, so a sliding window or context
 * shift fits in a cache sized for the window, not for the whole stream. The first 64
 * positions (the attention sinks) and the most recently written `window` tokens stay in f16;
 * older ones are compressed in pages of 64 positions. Memory, page tables included, is
 * allocated page by page as tokens arrive and freed when tokens are removed: an empty cache
 * costs about 256 x head_dim bytes per layer plus 160 bytes per (layer, sequence), whatever
 * its max_tokens.
 *
 * Create with dspark_cache_new(), release with dspark_cache_delete(). See the Conventions
 * (top of this file) for thread safety.
 */
typedef struct dspark_cache dspark_cache_t;

/** The shape and format of a cache. */
typedef struct dspark_cache_params {
    /** Set to `sizeof(dspark_cache_params)` (dspark_cache_params_init() does). */
    size_t size;
    /** Layers. >= 1. */
    uint32_t n_layer;
    /** KV heads per layer. >= 1. */
    uint32_t n_head_kv;
    /** Query heads (GQA): a multiple of n_head_kv; query head h reads KV head
     *  h / (n_head / n_head_kv). */
    uint32_t n_head;
    /** Values per head row: a multiple of 32, at most 4096. */
    uint32_t head_dim;
    /** Positions of each sequence (per layer): 1 .. INT32_MAX. */
    uint32_t max_tokens;
    /** Sequences: ids 0 .. n_seq_max - 1. >= 1. Default 1. */
    uint32_t n_seq_max;
    /** KV format name as in dspark_config: "f16" or "k<b>v<b>". NULL means "k4v4". Copied. */
    const char *format;
    /** Most recent tokens kept in f16 (rounded up to 64-token pages). Default 128. */
    uint32_t window;
    /** Worker threads the cache owns for dspark_cache_attn() (created on the first call
     *  that needs them, freed with the cache). 0 means one per CPU core. At most 256.
     *  Default 0. */
    uint32_t n_threads;
    /* Appended in API version 3 (an older caller's smaller struct gets the default). */
    /** Most bytes of KV pages the cache holds in RAM; compressed pages beyond it move to a
     *  spill file ($DSPARK_SPILL_DIR, else the system temp folder), least recently attended
     *  first; the f16 sinks and window stay. dspark_cache_attn() reads a layer's cold pages
     *  back for the call (RAM then exceeds the budget by that layer's pages; calls on one
     *  cache no longer run in parallel); seq_cp/seq_add and saves read all of them back for
     *  their duration. A failing spill file makes those calls return #DSPARK_ERR_IO with the
     *  cache unchanged. 0 (the default): no budget. */
    uint64_t kv_budget_bytes;
    /* Appended in API version 5. */
    /** Path of a profile from `dspark calibrate` (per-layer K/V widths): it replaces `format`
     *  and `window`. Its model must have n_layer layers of n_head_kv heads of head_dim
     *  values, else #DSPARK_ERR_FORMAT. Saves of a cache whose layers differ in width use
     *  file-format version 3 (per-layer widths), which older libraries refuse. NULL (the
     *  default): none. */
    const char *profile;
} dspark_cache_params;

/**
 * \brief Fills `params` with defaults and sets its `size`. The shape fields (n_layer,
 *        n_head_kv, n_head, head_dim, max_tokens) are set to 0 and must be filled in.
 * \param params The struct to fill. Must not be NULL.
 * \return #DSPARK_OK, or #DSPARK_ERR_NULL.
 */
dspark_status dspark_cache_params_init(dspark_cache_params *params);

/**
 * \brief Creates an empty cache.
 * \param params Shape and format. Must not be NULL. Not retained.
 * \param out Receives the new handle, owned by the caller: release it with
 *        dspark_cache_delete(). Must not be NULL.
 * \return #DSPARK_OK; #DSPARK_ERR_NULL, #DSPARK_ERR_SIZE, #DSPARK_ERR_ARG (a shape field is 0
 *         or inconsistent, max_tokens is above INT32_MAX, or the empty cache alone would
 *         take more than 256 MiB: see dspark_cache_t) or #DSPARK_ERR_FORMAT.
 */
dspark_status dspark_cache_new(const dspark_cache_params *params, dspark_cache_t **out);

/**
 * \brief Releases a cache and all its memory. The handle is invalid afterwards; passing it
 *        again to any function returns #DSPARK_ERR_HANDLE.
 *
 * Calls on other threads that are already running on this cache finish normally first.
 * \param cache The cache. NULL is allowed and does nothing (returns #DSPARK_OK).
 * \return #DSPARK_OK, or #DSPARK_ERR_HANDLE if `cache` is not a live cache.
 */
dspark_status dspark_cache_delete(dspark_cache_t *cache);

/**
 * \brief Appends the K and V rows of `n_tokens` tokens to one layer of one sequence, at the
 *        next positions (the layer's current length onwards).
 * \param cache The cache.
 * \param layer Layer, 0 .. n_layer - 1.
 * \param seq Sequence, 0 .. n_seq_max - 1.
 * \param k Keys, `[n_tokens][n_head_kv][head_dim]` f32, stored as an f16 KV cache holds
 *        them: finite values beyond the f16 range saturate to +-65504, non-finite values are
 *        stored as 0 (in compressed pages too).
 * \param v Values, same shape as `k`.
 * \param n_tokens Tokens to append. 0 does nothing (k and v may then be NULL).
 * \return #DSPARK_OK; #DSPARK_ERR_HANDLE, #DSPARK_ERR_NULL, #DSPARK_ERR_RANGE, or
 *         #DSPARK_ERR_FULL if the sequence would exceed max_tokens (nothing is appended).
 */
dspark_status dspark_cache_append(dspark_cache_t *cache, uint32_t layer, uint32_t seq,
                                  const float *k, const float *v, uint32_t n_tokens);

/**
 * \brief Tokens held by one layer of one sequence: the position the next appended token
 *        gets. Removed ranges in the middle (see dspark_cache_seq_rm()) still count.
 * \param cache The cache.
 * \param layer Layer, 0 .. n_layer - 1.
 * \param seq Sequence, 0 .. n_seq_max - 1.
 * \param out_len Receives the length. Must not be NULL.
 * \return #DSPARK_OK; #DSPARK_ERR_HANDLE, #DSPARK_ERR_NULL or #DSPARK_ERR_RANGE.
 */
dspark_status dspark_cache_seq_len(const dspark_cache_t *cache, uint32_t layer, uint32_t seq,
                                   uint32_t *out_len);

/** Element type of an attention mask. */
typedef enum dspark_mask_type {
    DSPARK_MASK_F32 = 0, /**< `float` values. */
    DSPARK_MASK_F16 = 1  /**< IEEE half values stored as `uint16_t`. */
} dspark_mask_type;

/** dspark_attn_params.flags: query i sits at position `len - n_q + i` (the last n_q tokens
 *  appended) and sees only positions up to its own. Without it every query sees every
 *  token of the sequence. */
#define DSPARK_ATTN_CAUSAL 1u

/** Parameters of dspark_cache_attn(); the semantics follow ggml's GGML_OP_FLASH_ATTN_EXT. */
typedef struct dspark_attn_params {
    /** Set to `sizeof(dspark_attn_params)` (dspark_attn_params_init() does). */
    size_t size;
    /** Score scale: score = dot(q, k) * scale. 0 means 1 / sqrt(head_dim). Default 0. */
    float scale;
    /** ALiBi maximum bias (ggml's slopes per query head); 0 disables ALiBi. Default 0. */
    float max_bias;
    /** Logit soft-capping: score = softcap * tanh(score / softcap); 0 disables it. Default 0. */
    float softcap;
    /** DSPARK_ATTN_* flags. Default #DSPARK_ATTN_CAUSAL. */
    uint32_t flags;
    /** Optional additive mask shared by all heads, `[n_q][mask_stride]` of `mask_type`:
     *  query i, position c reads `mask[i * mask_stride + c]` for c in 0 .. len - 1 (len as
     *  dspark_cache_seq_len()). It is added to the score (times the ALiBi slope when
     *  max_bias > 0); -INFINITY drops the position. It is rounded to f16, as ggml does.
     *  Combined with the causal rule and with removed positions. NULL: no mask. */
    const void *mask;
    /** Element type of `mask`. Default #DSPARK_MASK_F32. */
    dspark_mask_type mask_type;
    /** Elements between two mask rows; 0 means len. Must be >= len when a mask is given. */
    uint32_t mask_stride;
    /** Optional attention sinks, `[n_head]` f32 logits: each enters the softmax denominator
     *  of its head only (gpt-oss style). NULL: none. */
    const float *sinks;
    /** Threads for this call, at most the cache's dspark_cache_params.n_threads; 0 uses
     *  all of them. They come from the cache's own workers: a call never spawns threads
     *  after the first. */
    uint32_t n_threads;
} dspark_attn_params;

/**
 * \brief Fills `params` with the defaults (scale 1/sqrt(head_dim), causal, no mask, no sinks)
 *        and sets its `size`.
 * \param params The struct to fill. Must not be NULL.
 * \return #DSPARK_OK, or #DSPARK_ERR_NULL.
 */
dspark_status dspark_attn_params_init(dspark_attn_params *params);

/**
 * \brief Attention of a batch of queries over one layer of one sequence, computed on the
 *        compressed rows: `out = softmax(score) V` per query head.
 *
 * A query whose every position is dropped (and that has no sink) gives zeros.
 * \param cache The cache (only read: calls may run concurrently).
 * \param layer Layer, 0 .. n_layer - 1.
 * \param seq Sequence, 0 .. n_seq_max - 1.
 * \param q Queries, `[n_q][n_head][head_dim]` f32. Must not be NULL if n_q > 0.
 * \param n_q Queries. With #DSPARK_ATTN_CAUSAL, at most the sequence's length.
 * \param params Parameters, or NULL for the defaults of dspark_attn_params_init().
 * \param out Receives `[n_q][n_head][head_dim]` f32. Must not be NULL if n_q > 0, and must
 *        not overlap q, the mask or the sinks. Untouched on every error but
 *        #DSPARK_ERR_INTERNAL (then its content is unspecified).
 * \return #DSPARK_OK; #DSPARK_ERR_HANDLE, #DSPARK_ERR_NULL, #DSPARK_ERR_SIZE,
 *         #DSPARK_ERR_RANGE or #DSPARK_ERR_ARG (more queries than tokens in a causal batch,
 *         a mask stride below the length, an unknown mask type or flag, a non-finite scale,
 *         max_bias or softcap, out overlapping an input).
 */
dspark_status dspark_cache_attn(const dspark_cache_t *cache, uint32_t layer, uint32_t seq,
                                const float *q, uint32_t n_q, const dspark_attn_params *params,
                                float *out);

/**
 * \brief Removes the tokens at positions [p0, p1) of a sequence, in every layer.
 *
 * If the range reaches the end of a layer's tokens, that layer's length becomes p0 (the next
 * token appended gets position p0) and its pages past p0 are freed. Otherwise the positions
 * become holes: attention skips them, positions after them keep their numbers, and pages
 * entirely inside a hole are freed.
 * \param cache The cache.
 * \param seq Sequence, 0 .. n_seq_max - 1, or -1 for every sequence.
 * \param p0 First position removed, 0 .. max_tokens.
 * \param p1 One past the last position removed; any negative value means "to the end" (as
 *        in llama.cpp's llama_memory_seq_rm). Otherwise p1 <= p0 does nothing, and positions
 *        at or past a layer's length are not tokens (removing them does nothing).
 * \return #DSPARK_OK; #DSPARK_ERR_HANDLE, #DSPARK_ERR_RANGE (seq out of range, p0 negative or
 *         above max_tokens); nothing is removed on error.
 */
dspark_status dspark_cache_seq_rm(dspark_cache_t *cache, int32_t seq, int32_t p0, int32_t p1);

/**
 * \brief Moves the tokens at positions [p0, p1) of a sequence by `delta` positions, in every
 *        layer (llama.cpp's llama_memory_seq_add, for a context shift or sliding window).
 *
 * Each token at position p in [p0, p1) gets position p + delta; its K and V rows move with
 * it, as stored (compressed rows are copied, not re-encoded; where a page ends up holding
 * rows from both f16 and compressed pages, its f16 rows are compressed, as they would be
 * later; the first page stays f16 and decodes compressed rows moved into it).
 * Positions are cells here: the cache does not apply RoPE, so K rows keep the rotation they
 * were appended with. A caller whose K carries RoPE and who wants exact attention after the
 * shift re-appends re-rotated rows; otherwise attention sees the old rotations (the usual
 * approximation of a context shift without a K shift).
 *
 * The positions the tokens leave become holes (attention skips them), except past the last
 * moved token when [p0, p1) reached the end of a layer: that layer's length then moves by
 * `delta` too, and the next appended token follows the moved ones. Example, a sliding window
 * that keeps the first 4 tokens and drops the next n: `seq_rm(c, s, 4, 4 + n)` then
 * `seq_add(c, s, 4 + n, -1, -n)`.
 * \param cache The cache.
 * \param seq Sequence, 0 .. n_seq_max - 1, or -1 for every sequence.
 * \param p0 First position moved, 0 .. max_tokens.
 * \param p1 One past the last position moved; any negative value means "to the end".
 *        p1 <= p0 or delta == 0 does nothing.
 * \param delta Positions to add (negative: towards 0).
 * \return #DSPARK_OK; #DSPARK_ERR_HANDLE, #DSPARK_ERR_RANGE (seq out of range, p0 negative or
 *         above max_tokens, or a token would move below 0 or to max_tokens or beyond), or
 *         #DSPARK_ERR_ARG (in some layer, [p0 + delta, p1 + delta) holds a token that is not
 *         moved). All or nothing: on error no layer or sequence is changed.
 */
dspark_status dspark_cache_seq_add(dspark_cache_t *cache, int32_t seq, int32_t p0, int32_t p1,
                                   int32_t delta);

/**
 * \brief Makes sequence `dst` an exact copy of sequence `src` (every layer, lengths and holes
 *        included; compressed rows are copied, not re-encoded). `dst`'s previous content is
 *        dropped. src == dst does nothing.
 * \param cache The cache.
 * \param src Source sequence, 0 .. n_seq_max - 1.
 * \param dst Destination sequence, 0 .. n_seq_max - 1.
 * \return #DSPARK_OK; #DSPARK_ERR_HANDLE or #DSPARK_ERR_RANGE.
 */
dspark_status dspark_cache_seq_cp(dspark_cache_t *cache, uint32_t src, uint32_t dst);

/**
 * \brief Empties every sequence but `seq`.
 * \param cache The cache.
 * \param seq The sequence to keep, 0 .. n_seq_max - 1.
 * \return #DSPARK_OK; #DSPARK_ERR_HANDLE or #DSPARK_ERR_RANGE.
 */
dspark_status dspark_cache_seq_keep(dspark_cache_t *cache, uint32_t seq);

/**
 * \brief Live figures of one cache (kv_bytes, pages, bits per element, attention calls).
 * \param cache The cache.
 * \param out Receives the figures; set `out->size` first (see dspark_stats). Must not be
 *        NULL.
 * \return #DSPARK_OK; #DSPARK_ERR_HANDLE, #DSPARK_ERR_NULL or #DSPARK_ERR_SIZE.
 */
dspark_status dspark_cache_stats(const dspark_cache_t *cache, dspark_stats *out);

/**@}*/

/* ===================================================================================== */
/** \name Cache persistence                                                             */
/* ===================================================================================== */
/**@{*/

/*
 * Saved caches are the allocated pages as stored (no re-encoding, so a loaded cache gives
 * bit-identical attention; an empty cache saves to a few bytes per layer and sequence,
 * whatever its max_tokens), with a header (magic "DSPARKKV", file-format version 2, shape,
 * format; version 3 when the layers have different widths from a profile, with each
 * layer's widths) and a CRC-32 over everything. An image loads only into a cache of the same
 * shape and the same widths in every layer. A load parses and checks the whole input into a new
 * cache before replacing the old content: beyond the CRC, every length, hole, page index and
 * tag, every f16 value (finite) and every compressed row's scale (finite, non-negative, in
 * the range the codec writes) is checked, so a truncated, corrupt, crafted, foreign or
 * mismatched input is refused and leaves the cache untouched. The window and thread count
 * are not saved: the cache loaded into keeps its own. Images of file-format version 1
 * (DSpark before API version 2) are refused with #DSPARK_ERR_VERSION.
 */

/**
 * \brief The exact number of bytes dspark_cache_save_mem() writes for the cache as it is now.
 * \param cache The cache.
 * \param out_size Receives the size in bytes. Must not be NULL.
 * \return #DSPARK_OK; #DSPARK_ERR_HANDLE or #DSPARK_ERR_NULL.
 */
dspark_status dspark_cache_save_size(const dspark_cache_t *cache, size_t *out_size);

/**
 * \brief Serialises the cache into a caller-provided buffer.
 * \param cache The cache.
 * \param buf Destination, `cap` bytes. Must not be NULL.
 * \param cap Capacity of `buf` in bytes; see dspark_cache_save_size().
 * \param out_written Receives the number of bytes written. May be NULL.
 * \return #DSPARK_OK; #DSPARK_ERR_HANDLE, #DSPARK_ERR_NULL, or #DSPARK_ERR_BUFFER if `cap` is
 *         too small (nothing is written).
 */
dspark_status dspark_cache_save_mem(const dspark_cache_t *cache, void *buf, size_t cap,
                                    size_t *out_written);

/**
 * \brief Replaces the cache's content with a serialised cache.
 *
 * The data must have the cache's shape (n_layer, n_head_kv, n_head, head_dim, max_tokens,
 * n_seq_max) and format.
 * \param cache The cache.
 * \param buf The bytes written by dspark_cache_save_mem() or dspark_cache_save_file(). Not
 *        retained. Must not be NULL unless len is 0.
 * \param len Their number.
 * \return #DSPARK_OK; #DSPARK_ERR_HANDLE, #DSPARK_ERR_NULL, #DSPARK_ERR_CORRUPT (truncated,
 *         damaged, or holding values no correct writer writes), #DSPARK_ERR_VERSION or
 *         #DSPARK_ERR_MISMATCH. On error the cache is unchanged.
 */
dspark_status dspark_cache_load_mem(dspark_cache_t *cache, const void *buf, size_t len);

/**
 * \brief Saves the cache to a file. The file is written under a temporary name in the same
 *        folder and renamed at the end, so an existing file is replaced only by a complete one.
 * \param cache The cache.
 * \param path File path (NUL-terminated, UTF-8 or the platform's bytes). Must not be NULL.
 * \return #DSPARK_OK; #DSPARK_ERR_HANDLE, #DSPARK_ERR_NULL or #DSPARK_ERR_IO.
 */
dspark_status dspark_cache_save_file(const dspark_cache_t *cache, const char *path);

/**
 * \brief Replaces the cache's content with a file written by dspark_cache_save_file().
 *        The whole file is read into memory and checked first.
 * \param cache The cache.
 * \param path File path. Must not be NULL.
 * \return As dspark_cache_load_mem(), plus #DSPARK_ERR_IO if the file cannot be read. On error
 *         the cache is unchanged.
 */
dspark_status dspark_cache_load_file(dspark_cache_t *cache, const char *path);

/**@}*/

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* DSPARK_H */
