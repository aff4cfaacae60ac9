/*
 * A llama.cpp host that decodes greedily with its KV cache on the DSPARK0 device, and prints
 * the generated token ids on one line ("tokens: 1 2 3 ...").
 *
 * Built two ways by tests/capi_plugin.rs:
 *  - DSPARK_STATIC defined: linked with libdspark.a (llama.cpp inside), DSPARK0 comes from
 *    dspark_register() of include/dspark.h;
 *  - otherwise: linked only with a shared llama.cpp (libllama, libggml, libggml-base; no
 *    DSpark library), built with GGML_BACKEND_DL; DSPARK0 is loaded by ggml from the plugin
 *    named in GGML_BACKEND_PATH, configured by DSPARK_FORMAT / DSPARK_WINDOW.
 *
 * Usage: plugin_host MODEL N_TOKENS
 */
#include "llama.h"
#include "ggml-backend.h"

#ifdef DSPARK_STATIC
#include "dspark.h"
#endif

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void quiet_log(enum ggml_log_level level, const char *text, void *user) {
    (void)user;
    if (level >= GGML_LOG_LEVEL_WARN) fputs(text, stderr);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s MODEL N_TOKENS\n", argv[0]);
        return 2;
    }
    const int n_gen = atoi(argv[2]);
    llama_log_set(quiet_log, NULL);
    ggml_backend_dev_t dev = NULL;
#ifdef DSPARK_STATIC
    dspark_config cfg;
    dspark_config_init(&cfg);
    cfg.format = getenv("DSPARK_FORMAT") ? getenv("DSPARK_FORMAT") : "k4v4";
    cfg.window = getenv("DSPARK_WINDOW") ? (uint32_t)atoi(getenv("DSPARK_WINDOW")) : 128;
    if (dspark_register(&cfg, &dev) != DSPARK_OK) {
        fprintf(stderr, "dspark_register: %s\n", dspark_last_error());
        return 1;
    }
#else
    ggml_backend_load_all(); /* the CPU backend, then GGML_BACKEND_PATH */
    dev = ggml_backend_dev_by_name("DSPARK0");
    if (!dev) {
        fprintf(stderr, "DSPARK0 not registered (GGML_BACKEND_PATH=%s)\n",
                getenv("GGML_BACKEND_PATH") ? getenv("GGML_BACKEND_PATH") : "");
        return 1;
    }
#endif
    llama_backend_init();

    ggml_backend_dev_t devs[2] = {dev, NULL};
    struct llama_model_params mp = llama_model_default_params();
    mp.devices = devs;
    mp.n_gpu_layers = -1;
    struct llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 512;
    cp.n_batch = 512;
    cp.n_ubatch = 512;
    cp.n_threads = 2;
    cp.n_threads_batch = 2;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED;
    cp.offload_kqv = true;
    cp.no_perf = true;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "cannot create a context\n");
        return 1;
    }
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    const char *prompt =
        "The history of the printing press begins in the fifteenth century, when Johannes "
        "Gutenberg combined movable metal type, oil-based ink and a wooden screw press. "
        "Within fifty years, presses were running in more than two hundred European cities, "
        "and the number of books in circulation grew from thousands to millions. In short,";
    llama_token toks[512];
    int n = llama_tokenize(vocab, prompt, (int32_t)strlen(prompt), toks, 512, true, false);
    if (n <= 0) {
        fprintf(stderr, "tokenize failed\n");
        return 1;
    }
    printf("tokens:");
    struct llama_batch batch = llama_batch_get_one(toks, n);
    for (int i = 0; i < n_gen; i++) {
        if (llama_decode(ctx, batch) != 0) {
            fprintf(stderr, "decode failed at step %d\n", i);
            return 1;
        }
        const float *logits = llama_get_logits_ith(ctx, -1);
        int n_vocab = llama_vocab_n_tokens(vocab), best = 0;
        for (int t = 1; t < n_vocab; t++)
            if (logits[t] > logits[best]) best = t;
        printf(" %d", best);
        toks[0] = best;
        batch = llama_batch_get_one(toks, 1);
    }
    printf("\n");
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
