// Kiln's example job in C: uses the whole host interface.
//
// It reads its args, kwargs and a buildset property, logs at three levels, reports
// nested progress, sets a property, writes an artifact into its result directory and
// returns a JSON value: exactly what the Python and JavaScript examples do.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "job.h"

// Host strings are not NUL-terminated: copy one into a C string (caller frees).
static char *cstr(const job_string_t *s) {
    char *out = malloc(s->len + 1);
    memcpy(out, s->ptr, s->len);
    out[s->len] = 0;
    return out;
}

static void say(kiln_plugin_host_log_level_t level, const char *text) {
    job_string_t message;
    job_string_dup(&message, text);
    kiln_plugin_host_log(level, &message);
    job_string_free(&message);
}

static void progress(const char **group, size_t depth, uint64_t current, uint64_t total, const char *status) {
    job_string_t names[2];
    for (size_t i = 0; i < depth; i++) job_string_dup(&names[i], group[i]);
    job_list_string_t path = { names, depth };
    job_string_t text;
    job_string_dup(&text, status);
    kiln_plugin_host_progress(&path, current, total, &text);
    for (size_t i = 0; i < depth; i++) job_string_free(&names[i]);
    job_string_free(&text);
}

// The strings of `"words": [...]` in a kwargs object (simple strings, no escapes).
static size_t words_of(const char *kwargs, char words[][64], size_t max) {
    const char *list = strstr(kwargs, "\"words\"");
    if (!list || !(list = strchr(list, '['))) return 0;
    size_t n = 0;
    const char *end = strchr(list, ']');
    for (const char *p = list; n < max && (p = strchr(p, '"')) && (!end || p < end);) {
        const char *close = strchr(p + 1, '"');
        if (!close) break;
        size_t len = (size_t)(close - p - 1);
        if (len > 63) len = 63;
        memcpy(words[n], p + 1, len);
        words[n][len] = 0;
        n++;
        p = close + 1;
    }
    return n;
}

bool exports_job_run(job_build_context_t *ctx, job_outcome_t *ret, job_job_error_t *err) {
    (void)err;
    char *args = cstr(&ctx->args);
    char *kwargs = cstr(&ctx->kwargs);
    char *builder = cstr(&ctx->builder);
    char words[32][64];
    size_t n = words_of(kwargs, words, 32);
    char line[512];

    snprintf(line, sizeof line, "args: %s", args);
    say(KILN_PLUGIN_TYPES_LOG_LEVEL_DEBUG, line);
    snprintf(line, sizeof line, "hello from c, %s #%lld", builder, (long long)ctx->number);
    say(KILN_PLUGIN_TYPES_LOG_LEVEL_INFO, line);
    snprintf(line, sizeof line, "%zu words to count", n);
    say(KILN_PLUGIN_TYPES_LOG_LEVEL_WARNING, line);

    const char *count_words[] = { "count", "words" };
    for (size_t i = 0; i < n; i++) progress(count_words, 2, i + 1, n, words[i]);
    const char *count[] = { "count" };
    progress(count, 1, 1, 1, "counted");

    job_string_t state, name, source, value, error;
    job_string_dup(&state, "counted");
    kiln_plugin_host_set_state(&state);
    job_string_free(&state);
    snprintf(line, sizeof line, "%zu", n);
    job_string_dup(&name, "word_count");
    job_string_dup(&value, line);
    job_string_dup(&source, "c");
    if (!kiln_plugin_host_set_property(&name, &value, &source, &error)) job_string_free(&error);
    job_string_free(&name);
    job_string_free(&value);
    job_string_free(&source);

    FILE *out = fopen("/results/words.txt", "w");
    if (out) {
        for (size_t i = 0; i < n; i++) fprintf(out, "%s\n", words[i]);
        fclose(out);
    }

    kiln_plugin_host_property_t greeting;
    job_string_t key;
    job_string_dup(&key, "greeting");
    char *greeting_json = NULL;
    if (kiln_plugin_host_get_property(&key, &greeting)) {
        greeting_json = cstr(&greeting.value);
        kiln_plugin_host_property_free(&greeting);
    }
    job_string_free(&key);

    // The return value must live on the heap: the host frees it after the call.
    char *result = malloc(strlen(args) + 256);
    sprintf(result, "{\"language\":\"c\",\"words\":%zu,\"greeting\":%s,\"args\":%s,\"properties\":%zu}",
            n, greeting_json ? greeting_json : "null", args, ctx->properties.len);
    ret->code = KILN_PLUGIN_TYPES_JOB_RESULT_SUCCESS;
    ret->return_value.ptr = (uint8_t *)result;
    ret->return_value.len = strlen(result);

    free(greeting_json);
    free(args);
    free(kwargs);
    free(builder);
    job_build_context_free(ctx);
    return true;
}
