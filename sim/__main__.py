"""`python -m sim [--seconds S] ...`: the noisy-neighbour simulator against the product's
settings (config.settings, or DJANGO_SETTINGS_MODULE), its database and Redis given by
DATABASE_URL and REDIS_URL as for the server."""

from __future__ import annotations

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django.setup()

from sim.command import main  # noqa: E402  (the simulator's modules import models)

main()
