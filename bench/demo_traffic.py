"""Mixed traffic against a running demo (`bin/run` with demo/quota.yaml), for as long as asked.

    .venv/bin/python -m bench.demo_traffic --url http://127.0.0.1:8000 \
        --key-acme KEY --key-globex KEY [--minutes 10] [--threads 8]

Each thread loops over the demo's three features: it reserves, then commits (most calls),
releases, or abandons the reservation (a short TTL: the lease reaper expires it), now and
then reads the feature's usage; every few seconds a thread loads the admin's dashboard when
given a login. So every Celery task has work: ingest, rollups, the reaper, alerts, the console
snapshot, while the web app reads the same database. It prints the answers by status; the
Celery side (task counts, failures) is read from the worker's log by whoever runs it.
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from collections import Counter

import httpx

FEATURES = (("acme", "chat"), ("acme", "report-gen"), ("globex", "ticket-triage"))
MODELS = ("gpt-4o-mini", "gpt-4o")
ABANDON_TTL_SECONDS = 5
TALLY_LOCK = threading.Lock()


def parser_create() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.demo_traffic", description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--key-acme", required=True)
    parser.add_argument("--key-globex", required=True)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--admin-user", default="")
    parser.add_argument("--admin-password", default="")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--pause", type=float, default=0.05, help="mean seconds between one thread's calls"
    )
    parser.add_argument(
        "--max-wait", type=float, default=1.0, help="at most this long a refused call waits"
    )
    return parser


def one_call(
    client: httpx.Client,
    keys: dict[str, str],
    rng: random.Random,
    tally: Counter,
    max_wait: float,
) -> None:
    tenant, feature = rng.choice(FEATURES)
    headers = {"Authorization": f"Bearer {keys[tenant]}"}
    fate = rng.random()
    body = {
        "feature": feature,
        "model": rng.choice(MODELS),
        "input_tokens": rng.randint(200, 2_000),
        "max_output_tokens": rng.randint(100, 800),
    }
    if fate >= 0.95:
        body["ttl_seconds"] = ABANDON_TTL_SECONDS
    answer = client.post("/api/v1/reservations", json=body, headers=headers)
    tally[f"reserve {answer.status_code}"] += 1
    if answer.status_code == 429:
        # a well-behaved caller waits (here at most --max-wait) before trying again
        time.sleep(min(max_wait, float(answer.headers.get("Retry-After", 1))))
    if answer.status_code != 201:
        return
    rid = answer.json()["id"]
    if fate < 0.85:
        usage = {
            "input_tokens": body["input_tokens"],
            "output_tokens": rng.randint(10, int(body["max_output_tokens"])),
            "finish_reason": rng.choice(["stop"] * 9 + ["length"]),
            "upstream_status": rng.choice([200] * 30 + [429]),
        }
        done = client.post(f"/api/v1/reservations/{rid}/commit", json=usage, headers=headers)
        tally[f"commit {done.status_code}"] += 1
    elif fate < 0.95:
        done = client.post(f"/api/v1/reservations/{rid}/release", headers=headers)
        tally[f"release {done.status_code}"] += 1
    else:
        tally["abandoned"] += 1
    if rng.random() < 0.05:
        usage_answer = client.get(f"/api/v1/features/{feature}/usage", headers=headers)
        tally[f"usage {usage_answer.status_code}"] += 1


def admin_login(client: httpx.Client, user: str, password: str) -> bool:
    client.get("/admin/login/")
    token = client.cookies.get("csrftoken", "")
    answer = client.post(
        "/admin/login/?next=/admin/",
        data={"username": user, "password": password, "csrfmiddlewaretoken": token},
        headers={"Referer": f"{client.base_url}admin/login/"},
    )
    return answer.status_code == 200 and "logout" in answer.text.lower()


def worker(options: argparse.Namespace, index: int, until: float, tally: Counter) -> None:
    rng = random.Random(options.seed * 1000 + index)
    keys = {"acme": options.key_acme, "globex": options.key_globex}
    local: Counter = Counter()
    next_admin = time.monotonic()
    with httpx.Client(base_url=options.url, timeout=30) as client:
        admin = None
        if options.admin_user and index == 0:
            admin = httpx.Client(base_url=options.url, timeout=30, follow_redirects=True)
            try:
                logged_in = admin_login(admin, options.admin_user, options.admin_password)
            except httpx.HTTPError:
                logged_in = False
            if not logged_in:
                local["admin login failed"] += 1
                admin = None
        while time.monotonic() < until:
            try:
                one_call(client, keys, rng, local, options.max_wait)
                time.sleep(rng.uniform(0, 2 * options.pause))
                if admin is not None and time.monotonic() >= next_admin:
                    page = admin.get("/admin/")
                    local[f"admin dashboard {page.status_code}"] += 1
                    next_admin = time.monotonic() + 5
            except httpx.HTTPError as error:
                local[f"error {type(error).__name__}"] += 1
        if admin is not None:
            admin.close()
    with TALLY_LOCK:
        tally.update(local)


def main() -> None:
    options = parser_create().parse_args()
    until = time.monotonic() + options.minutes * 60
    tally: Counter = Counter()
    threads = [
        threading.Thread(target=worker, args=(options, i, until, tally))
        for i in range(options.threads)
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    print(f"{elapsed:.0f} s, {sum(tally.values())} answers")
    for name, count in sorted(tally.items()):
        print(f"  {name}: {count}")


if __name__ == "__main__":
    main()
