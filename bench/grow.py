"""`python -m bench.grow N`: grows the benchmark database that DATABASE_URL names to N
features (settings from DJANGO_SETTINGS_MODULE, the config version bumped in REDIS_URL)."""

import sys

import django

if __name__ == "__main__":
    django.setup()
    from bench.fixtures import features_grow

    features_grow(int(sys.argv[1]))
