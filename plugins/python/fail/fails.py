"""A Python job that fails with a job error: the build ends as FAILURE with the
message, and the details become its traceback."""

import wit_world
from componentize_py_types import Err
from wit_world.imports import host, types


class WitWorld(wit_world.WitWorld):
    def run(self, ctx: types.BuildContext) -> types.Outcome:
        host.log(types.LogLevel.ERROR, "about to fail")
        raise Err(types.JobError("python job failed on purpose", "details from python"))
