"""A fresh web process, for tests/quotas/test_settle_without_database.py: it sends the API
calls read from stdin (JSON) through Django's whole request cycle and writes what each
answered to stdout (JSON). The test starts it with a database that refuses connections."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import django


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    django.setup()
    from django.db import DatabaseError, connection
    from rest_framework.test import APIClient

    try:
        connection.ensure_connection()
        reachable = True
    except DatabaseError:
        reachable = False
    answers = [_answer(APIClient(), call) for call in json.load(sys.stdin)]
    json.dump({"database_reachable": reachable, "answers": answers}, sys.stdout)


def _answer(client: Any, call: dict[str, Any]) -> dict[str, Any]:
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {call['key']}")
    if call["method"] == "get":
        response = client.get(call["path"])
    else:
        response = client.post(call["path"], call.get("body", {}), format="json")
    return {
        "status": response.status_code,
        "body": response.json(),
        "retry_after": response.get("Retry-After"),
    }


if __name__ == "__main__":
    main()
