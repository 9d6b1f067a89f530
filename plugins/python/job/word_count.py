"""Kiln's example job in Python: uses the whole host interface.

It reads its args, kwargs and a buildset property, logs at three levels, reports
nested progress, sets a property, writes an artifact into its result directory and
returns a JSON value. The C and JavaScript examples do exactly the same, so that one
test checks all three.
"""

import json

import wit_world
from wit_world.imports import host, types


class WitWorld(wit_world.WitWorld):
    def run(self, ctx: types.BuildContext) -> types.Outcome:
        args = json.loads(ctx.args)
        kwargs = json.loads(ctx.kwargs)
        properties = {p.name: json.loads(p.value) for p in ctx.properties}
        words = kwargs.get("words", [])

        host.log(types.LogLevel.DEBUG, "args: " + json.dumps(args, separators=(",", ":")))
        host.log(types.LogLevel.INFO, f"hello from python, {ctx.builder} #{ctx.number}")
        host.log(types.LogLevel.WARNING, f"{len(words)} words to count")

        for i, word in enumerate(words, start=1):
            host.progress(["count", "words"], i, len(words), word)
        host.progress(["count"], 1, 1, "counted")
        host.set_state("counted")
        host.set_property("word_count", json.dumps(len(words)), "python")

        with open("/results/words.txt", "w") as out:
            out.write("".join(word + "\n" for word in words))

        greeting = host.get_property("greeting")
        return types.Outcome(
            types.JobResult.SUCCESS,
            json.dumps(
                {
                    "language": "python",
                    "words": len(words),
                    "greeting": json.loads(greeting.value) if greeting else None,
                    "args": args,
                    "properties": len(properties),
                }
            ),
        )
