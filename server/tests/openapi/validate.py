"""Validates Kiln's OpenAPI document, then real answers against it.

usage: validate.py SPEC.json ANSWERS.json

SPEC.json is /api/v2/openapi.json. ANSWERS.json is a list of
{"template": "/builds/{id}", "path": "/builds/3", "method": "get", "status": "200",
 "body": {...}}: each body must match the schema the document declares for that
operation and status. Prints every mismatch and exits 1 if there is any.
"""

import json
import sys

from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate


def main() -> int:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    validate(spec)
    with open(sys.argv[2]) as f:
        answers = json.load(f)
    failures = []
    for answer in answers:
        operation = spec["paths"][answer["template"]][answer["method"]]
        declared = operation["responses"][answer["status"]]["content"]["application/json"]["schema"]
        schema = dict(declared, components=spec["components"])
        for error in OAS31Validator(schema).iter_errors(answer["body"]):
            where = "/".join(str(p) for p in error.absolute_path)
            failures.append(f"{answer['method'].upper()} {answer['path']} ({answer['status']}) at /{where}: {error.message}")
    for failure in failures:
        print(failure)
    print(f"the document is valid; {len(answers)} answers checked, {len(failures)} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
