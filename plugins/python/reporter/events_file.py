"""Kiln's jsonl reporter in Python: appends each event's JSON to the file named by the
reporter's config (`{"path": "/out/events.jsonl"}`) in a directory it is granted."""

import json

import wit_world
from componentize_py_types import Err
from wit_world.imports import types


class WitWorld(wit_world.WitWorld):
    def report(self, config: str, event: types.Event) -> None:
        path = json.loads(config).get("path")
        if not path:
            raise Err("config needs a `path` to append to")
        with open(path, "a") as out:
            out.write(event.payload + "\n")
