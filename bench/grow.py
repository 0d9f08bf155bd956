"""`python -m bench.grow N`: grows the benchmark database that DATABASE_URL names to N
features (settings from DJANGO_SETTINGS_MODULE, the config version bumped in REDIS_URL).

The database is a copy of the first configuration's and REDIS_URL a Redis database of its
own: to the product that is a store that lost its data, so it is rebuilt from the (empty)
ledger, as `quota rebuild` does, before any server decides with it."""

import sys

import django

if __name__ == "__main__":
    django.setup()
    from bench.fixtures import features_grow
    from ledger.recovery import store_rebuild

    features_grow(int(sys.argv[1]))
    store_rebuild(force=True)
