// A C job that fails with a job error: the build ends as FAILURE with the message, and
// the details become its traceback.
#include "job.h"

bool exports_job_run(job_build_context_t *ctx, job_outcome_t *ret, job_job_error_t *err) {
    (void)ret;
    job_string_t message;
    job_string_dup(&message, "about to fail");
    kiln_plugin_host_log(KILN_PLUGIN_TYPES_LOG_LEVEL_ERROR, &message);
    job_string_free(&message);
    job_string_dup(&err->message, "c job failed on purpose");
    err->details.is_some = true;
    job_string_dup(&err->details.val, "details from c");
    job_build_context_free(ctx);
    return false;
}
