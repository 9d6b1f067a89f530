// The fail-fast relationship policy in C: the first failed child cancels the rest, and
// the parent gets the worst result so far; otherwise it waits for every child and takes
// the worst. It makes the same decisions as the bundled Rust `fail-fast`.
#include "policy.h"

// Buildbot's "worst" ranking: CANCELLED > RETRY > EXCEPTION > FAILURE > WARNINGS >
// SUCCESS > SKIPPED.
static int severity(uint8_t code) {
    static const int rank[] = { 1, 2, 3, 0, 4, 5, 6 };
    return code < 7 ? rank[code] : 0;
}

static int is_failure(uint8_t code) {
    return code == KILN_PLUGIN_TYPES_RESULT_CODE_FAILURE || code == KILN_PLUGIN_TYPES_RESULT_CODE_EXCEPTION
        || code == KILN_PLUGIN_TYPES_RESULT_CODE_CANCELLED || code == KILN_PLUGIN_TYPES_RESULT_CODE_RETRY;
}

void exports_policy_decide(policy_parent_build_t *parent, policy_list_child_t *children, policy_decision_t *ret) {
    int all_complete = 1, failed = 0, have = 0;
    uint8_t worst = KILN_PLUGIN_TYPES_RESULT_CODE_SUCCESS;
    for (size_t i = 0; i < children->len; i++) {
        kiln_plugin_types_child_t *c = &children->ptr[i];
        if (!c->complete) all_complete = 0;
        if (c->results.is_some) {
            uint8_t r = c->results.val;
            if (is_failure(r)) failed = 1;
            if (!have || severity(r) > severity(worst)) worst = r;
            have = 1;
        }
    }
    if (failed) {
        ret->tag = all_complete ? KILN_PLUGIN_TYPES_DECISION_FINISH : KILN_PLUGIN_TYPES_DECISION_CANCEL_REST;
        ret->val.finish = worst; // the same slot as cancel_rest
    } else if (all_complete) {
        ret->tag = KILN_PLUGIN_TYPES_DECISION_FINISH;
        ret->val.finish = have ? worst : KILN_PLUGIN_TYPES_RESULT_CODE_SUCCESS;
    } else {
        ret->tag = KILN_PLUGIN_TYPES_DECISION_WAIT;
    }
    policy_parent_build_free(parent);
    policy_list_child_free(children);
}
