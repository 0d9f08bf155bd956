"""The two baselines the reservation API is measured against, in the same run and request shape:
a POST with a JSON body, parsed, then one decision in Redis.

`bare` is one EVALSHA of a 3-bucket token-bucket script (the least a distributed limiter can
do); `ratelimited` is what most Django projects reach for, django-ratelimit on the same Redis.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST
from django_ratelimit.decorators import ratelimit
from redis.commands.core import Script

from quotas.store import get_redis

BUCKET_KEYS = ["bench:{bare}:pool", "bench:{bare}:tenant", "bench:{bare}:feature"]
CAPACITY = 10**12
REFILL_PER_SECOND = CAPACITY // 60


@lru_cache(maxsize=1)
def _bucket3() -> Script:
    # redis-py's Script calls EVALSHA and loads the script only on NOSCRIPT.
    return get_redis().register_script((Path(__file__).parent / "bucket3.lua").read_text())


def _cost(request: HttpRequest) -> int:
    body = json.loads(request.body)
    return int(body.get("input_tokens", 0)) + int(body.get("max_output_tokens", 0))


@csrf_exempt
@require_POST
def bare(request: HttpRequest) -> JsonResponse:
    args = [_cost(request)] + [CAPACITY, REFILL_PER_SECOND] * len(BUCKET_KEYS)
    admitted, value = _bucket3()(keys=BUCKET_KEYS, args=args)
    return JsonResponse({"admitted": bool(admitted), "remaining": value})


@csrf_exempt
@require_POST
@ratelimit(key="ip", rate="1000000/m", block=False)
def ratelimited(request: HttpRequest) -> JsonResponse:
    _cost(request)
    return JsonResponse({"admitted": not getattr(request, "limited", False)})
