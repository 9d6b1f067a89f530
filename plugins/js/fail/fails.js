// A JavaScript job that fails with a job error: the build ends as FAILURE with the
// message, and the details become its traceback.
import host from "kiln:plugin/host@0.1.0";

export function run(ctx) {
  host.log("error", "about to fail");
  throw { message: "javascript job failed on purpose", details: "details from javascript" };
}
